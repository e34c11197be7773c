//! Where each side of a round is: the server's [`Phase`] and a client's [`ClientPhase`], in
//! their own module so that the error type names them without importing either state machine.

use std::fmt;

/// Where a [`Server`](super::Server) is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Collecting key adverts ([`Server::advertise`](super::Server::advertise)).
    Advertise,
    /// Collecting encrypted shares ([`Server::submit_shares`](super::Server::submit_shares)).
    ShareKeys,
    /// Collecting masked inputs ([`Server::submit_masked`](super::Server::submit_masked)).
    MaskedInput,
    /// Collecting reveals ([`Server::submit_reveals`](super::Server::submit_reveals)), then [`Server::finish`](super::Server::finish).
    Unmask,
    /// Too few clients were left; the round is over without a result.
    Aborted,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Advertise => "advertise",
            Phase::ShareKeys => "share-keys",
            Phase::MaskedInput => "masked-input",
            Phase::Unmask => "unmask",
            Phase::Aborted => "aborted",
        })
    }
}

/// Where a [`Client`](super::Client) is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientPhase {
    /// Keys made and advertised; waiting for the assignment.
    ShareKeys,
    /// Shares sent; waiting for the neighbours' shares to mask the input.
    MaskedInput,
    /// Masked input sent; waiting for the survivor lists.
    Unmask,
    /// Reveals sent; nothing is left to do.
    Done,
}

impl fmt::Display for ClientPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientPhase::ShareKeys => "share-keys",
            ClientPhase::MaskedInput => "masked-input",
            ClientPhase::Unmask => "unmask",
            ClientPhase::Done => "done",
        })
    }
}
