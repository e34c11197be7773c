//! The one error type of the module.

use thiserror::Error;

use super::phase::{ClientPhase, Phase};
use super::secret::RevealKind;

/// Everything that can go wrong in a round. Messages name the indices,
/// phases and lengths involved; none contains secret material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SecAggError {
    // --- parameters -------------------------------------------------------
    /// Fewer clients than [`MIN_CLIENTS`](super::MIN_CLIENTS).
    #[error("{clients} clients: secure aggregation needs at least {min} clients")]
    TooFewClients { clients: u32, min: u32 },
    /// More clients than [`MAX_CLIENTS`](super::MAX_CLIENTS).
    #[error("{clients} clients: secure aggregation supports at most {max} clients")]
    TooManyClients { clients: u32, max: u32 },
    /// `k` below [`MIN_NEIGHBOURS`](super::MIN_NEIGHBOURS).
    #[error("{neighbours} neighbours: each client needs at least {min} neighbours")]
    TooFewNeighbours { neighbours: u32, min: u32 },
    /// `k` above [`MAX_NEIGHBOURS`](super::MAX_NEIGHBOURS).
    #[error("{neighbours} neighbours: GF(256) shares allow at most {max} neighbours")]
    TooManyNeighbours { neighbours: u32, max: u32 },
    /// `k > n - 1`.
    #[error("{neighbours} neighbours but only {clients} clients (at most clients - 1)")]
    NeighboursExceedCohort { neighbours: u32, clients: u32 },
    /// Odd `k` in a sparse graph.
    #[error(
        "{neighbours} neighbours is odd: the ring graph needs an even count \
         unless it is the complete graph ({clients} clients - 1)"
    )]
    OddNeighbours { neighbours: u32, clients: u32 },
    /// `t <= k/2`.
    #[error("threshold {threshold} is not a majority of {neighbours} neighbours")]
    ThresholdTooLow { threshold: u32, neighbours: u32 },
    /// `t > k`.
    #[error("threshold {threshold} exceeds {neighbours} neighbours")]
    ThresholdTooHigh { threshold: u32, neighbours: u32 },
    /// The signed sum could leave the `i32` range.
    #[error(
        "{clients} clients x {max_abs_per_client} per client does not fit in i32: \
         the sum mod 2^32 would wrap"
    )]
    HeadroomExceeded {
        clients: u32,
        max_abs_per_client: u64,
    },
    /// The input length does not fit the `u32` carried in an assignment.
    #[error("vector length {len} exceeds u32::MAX")]
    VectorTooLong { len: usize },

    // --- state machine ----------------------------------------------------
    /// A server operation was called in the wrong phase.
    #[error("cannot {op} in the {phase} phase")]
    WrongPhase { op: &'static str, phase: Phase },
    /// A client operation was called in the wrong phase.
    #[error("client cannot {op} in its {phase} phase")]
    WrongClientPhase {
        op: &'static str,
        phase: ClientPhase,
    },

    // --- randomness and primitives ----------------------------------------
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
    /// A primitive failed in a way valid inputs cannot cause.
    #[error("internal cryptographic failure: {0}")]
    Crypto(&'static str),
    /// X25519 with this peer's key gave the all-zero secret.
    #[error("public key of client {peer} is a low-order point (all-zero X25519 secret)")]
    LowOrderKey { peer: u32 },

    // --- advertise phase --------------------------------------------------
    /// The same participant advertised twice.
    #[error("participant has already advertised keys this round")]
    DuplicateParticipant,
    /// An advert repeats a key already advertised (by anyone, or as its own
    /// other key).
    #[error("advertised public key is already in use this round")]
    AdvertKeyReused,
    /// An advert carries a low-order public key.
    #[error("advertised public key is a low-order point")]
    AdvertLowOrderKey,

    // --- assignment checks (client) ----------------------------------------
    /// An index is not in `0..clients`.
    #[error("index {index} out of range for {clients} clients")]
    IndexOutOfRange { index: u32, clients: u32 },
    /// The assignment does not carry this client's own keys at its index.
    #[error("assignment for index {index} does not carry this client's own keys")]
    AssignmentOwnKeys { index: u32 },
    /// The assignment's neighbour list is not `neighbours_of(index)`.
    #[error("assignment for index {index} lists neighbours {got:?}, expected {expected:?}")]
    AssignmentNeighbours {
        index: u32,
        expected: Vec<u32>,
        got: Vec<u32>,
    },
    /// Two adverts in an assignment share a public key.
    #[error("client {index} advertises a public key already used by client {other}")]
    DuplicateKey { index: u32, other: u32 },

    // --- share phase ------------------------------------------------------
    /// A submission claims a different sender than the one submitting.
    #[error("message from client {from} claims to be from client {claimed}")]
    SenderMismatch { from: u32, claimed: u32 },
    /// A share is addressed to someone else.
    #[error("share for client {to} delivered to client {me}")]
    WrongRecipient { to: u32, me: u32 },
    /// Two indices that are not neighbours exchanged a share or reveal.
    #[error("clients {from} and {to} are not neighbours")]
    NotNeighbour { from: u32, to: u32 },
    /// A second share for the same (from, to).
    #[error("duplicate share from client {from} to client {to}")]
    DuplicateShare { from: u32, to: u32 },
    /// A client sent the wrong number of shares.
    #[error("client {from} sent {got} shares, expected one per neighbour ({expected})")]
    ShareCount {
        from: u32,
        expected: usize,
        got: usize,
    },
    /// An encrypted share has the wrong length.
    #[error("share from client {from} to client {to} is {len} bytes, expected {expected}")]
    CiphertextLength {
        from: u32,
        to: u32,
        len: usize,
        expected: usize,
    },
    /// An encrypted share does not decrypt (tampered, misrouted or garbage).
    #[error("share from client {from} to client {to} failed to decrypt")]
    DecryptFailed { from: u32, to: u32 },
    /// A decrypted share has the wrong length or x-coordinate.
    #[error("share from client {from} to client {to} is malformed")]
    MalformedShare { from: u32, to: u32 },
    /// Too few of a client's neighbours remain for its secrets to be
    /// reconstructible (the round aborts, or the client refuses to go on).
    #[error(
        "client {index}: only {have} of its neighbours remain in the {stage} stage, \
         threshold is {threshold}"
    )]
    NeighbourhoodTooSmall {
        index: u32,
        stage: &'static str,
        have: usize,
        threshold: u32,
    },
    /// Nobody is left.
    #[error("no client completed the {stage} stage")]
    NoneLeft { stage: &'static str },

    // --- masked-input phase -----------------------------------------------
    /// Input or masked vector of the wrong length.
    #[error("vector from client {index} has {got} words, expected {expected}")]
    VectorLength {
        index: u32,
        expected: usize,
        got: usize,
    },
    /// A client outside U2 tried to submit a masked input.
    #[error("client {index} did not complete the share phase")]
    NotInShareSet { index: u32 },
    /// A second submission in the same phase.
    #[error("client {index} already submitted in the {phase} phase")]
    AlreadySubmitted { index: u32, phase: Phase },

    // --- unmask phase (client checks) ---------------------------------------
    /// An index appears twice in one list.
    #[error("index {index} appears twice in the {list} list")]
    DuplicateInList { index: u32, list: &'static str },
    /// An index is both a survivor and dropped.
    #[error("index {index} is listed both as survivor and as dropped")]
    ListedAsBoth { index: u32 },
    /// The client is told it dropped, though it sent its masked input.
    #[error("client {index} is listed as dropped")]
    SelfDropped { index: u32 },
    /// The client is missing from the survivors it belongs to.
    #[error("client {index} sent its masked input but is not listed as a survivor")]
    SelfNotSurvivor { index: u32 },
    /// The lists disagree with the shares this client received.
    #[error("client {index}: neighbour {neighbour} {reason}")]
    InconsistentLists {
        index: u32,
        neighbour: u32,
        reason: &'static str,
    },

    // --- unmask phase (server checks) ---------------------------------------
    /// A client outside U3 tried to reveal.
    #[error("client {index} sent no masked input and may not reveal shares")]
    NotSurvivor { index: u32 },
    /// A client revealed the wrong number of shares.
    #[error("client {from} revealed {got} shares, expected {expected}")]
    RevealCount {
        from: u32,
        expected: usize,
        got: usize,
    },
    /// A reveal about a client the revealer holds no share of.
    #[error("client {from} holds no share about client {about}")]
    RevealNotExpected { from: u32, about: u32 },
    /// Two reveals about the same client.
    #[error("client {from} revealed twice about client {about}")]
    DuplicateReveal { from: u32, about: u32 },
    /// A reveal of the secret the server must not get for this client.
    #[error("client {from} revealed the wrong secret about client {about}: expected {expected}")]
    WrongRevealKind {
        from: u32,
        about: u32,
        expected: RevealKind,
    },
    /// A revealed share has the wrong length or x-coordinate.
    #[error("share revealed by client {from} about client {about} is malformed")]
    MalformedReveal { from: u32, about: u32 },

    // --- finish -------------------------------------------------------------
    /// Fewer than `t` shares arrived for a secret the server needs.
    #[error("client {index}: {got} shares of its {kind}, threshold is {threshold}")]
    NotEnoughShares {
        index: u32,
        kind: RevealKind,
        got: usize,
        threshold: u32,
    },
    /// The shares of a secret do not agree with each other.
    #[error("client {index}: the revealed shares of its {kind} are inconsistent")]
    InconsistentShares { index: u32, kind: RevealKind },
    /// The reconstructed mask key does not match the advertised public key.
    #[error("client {index}: reconstructed mask key does not match its advertised key")]
    KeyMismatch { index: u32 },
}
