//! The two secrets a client Shamir-shares with its neighbours, and so which one a reveal
//! carries: [`RevealKind`]. Its own module, so that the error type names it without
//! importing the messages (which import the parameters, which return errors).

use std::fmt;

/// Which secret a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevealKind {
    /// A share of `b_u`, revealed for a client that survived.
    SelfMaskSeed,
    /// A share of the mask secret key `s_sk`, revealed for a client that
    /// dropped after the share phase.
    MaskKey,
}

impl fmt::Display for RevealKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevealKind::SelfMaskSeed => "self-mask seed",
            RevealKind::MaskKey => "mask key",
        })
    }
}
