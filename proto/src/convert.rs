//! Every conversion between the wire's SecAgg+ messages and `fedpersona_privacy::secagg`'s
//! domain types, once, for both sides (the agent, the aggregator's service and its bench).
//! What needs a policy decision (key lengths, the masked vector's size) is checked by the
//! caller, which knows what to answer.

use fedpersona_privacy::secagg::{EncryptedShare, Reveal, RevealKind, Survivors};

use crate::v1 as pb;

impl From<&[EncryptedShare]> for pb::SecAggShares {
    fn from(shares: &[EncryptedShare]) -> Self {
        pb::SecAggShares {
            shares: shares
                .iter()
                .map(|s| pb::SecAggShare {
                    from: s.from,
                    to: s.to,
                    ciphertext: s.ciphertext.clone(),
                })
                .collect(),
        }
    }
}

impl pb::SecAggShares {
    pub fn into_shares(self) -> Vec<EncryptedShare> {
        self.shares
            .into_iter()
            .map(|s| EncryptedShare {
                from: s.from,
                to: s.to,
                ciphertext: s.ciphertext,
            })
            .collect()
    }
}

impl From<&[Reveal]> for pb::SecAggReveals {
    fn from(reveals: &[Reveal]) -> Self {
        pb::SecAggReveals {
            reveals: reveals
                .iter()
                .map(|r| pb::SecAggReveal {
                    from: r.from,
                    about: r.about,
                    self_mask: r.kind == RevealKind::SelfMaskSeed,
                    share: r.share.clone(),
                })
                .collect(),
        }
    }
}

impl pb::SecAggReveals {
    pub fn into_reveals(self) -> Vec<Reveal> {
        self.reveals
            .into_iter()
            .map(|r| Reveal {
                from: r.from,
                about: r.about,
                kind: if r.self_mask {
                    RevealKind::SelfMaskSeed
                } else {
                    RevealKind::MaskKey
                },
                share: r.share,
            })
            .collect()
    }
}

impl From<&Survivors> for pb::SecAggSurvivors {
    fn from(s: &Survivors) -> Self {
        pb::SecAggSurvivors {
            survivors: s.survivors.clone(),
            dropped: s.dropped.clone(),
        }
    }
}

impl From<pb::SecAggSurvivors> for Survivors {
    fn from(s: pb::SecAggSurvivors) -> Self {
        Survivors {
            survivors: s.survivors,
            dropped: s.dropped,
        }
    }
}

/// A masked input's words (elements of Z_{2^32}) as the wire's little-endian bytes.
pub fn masked_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The words of a masked input of `len` words; None when the bytes are not `4·len`.
pub fn masked_words(bytes: &[u8], len: usize) -> Option<Vec<u32>> {
    (bytes.len() == len.checked_mul(4)?).then(|| {
        bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secagg_messages_round_trip() {
        let shares = vec![
            EncryptedShare {
                from: 1,
                to: 2,
                ciphertext: vec![9; 61],
            },
            EncryptedShare {
                from: 1,
                to: 0,
                ciphertext: vec![],
            },
        ];
        assert_eq!(pb::SecAggShares::from(&shares[..]).into_shares(), shares);
        let reveals = vec![
            Reveal {
                from: 0,
                about: 3,
                kind: RevealKind::SelfMaskSeed,
                share: vec![1; 33],
            },
            Reveal {
                from: 0,
                about: 4,
                kind: RevealKind::MaskKey,
                share: vec![2; 33],
            },
        ];
        assert_eq!(
            pb::SecAggReveals::from(&reveals[..]).into_reveals(),
            reveals
        );
        let s = Survivors {
            survivors: vec![0, 2],
            dropped: vec![1],
        };
        assert_eq!(Survivors::from(pb::SecAggSurvivors::from(&s)), s);
    }

    #[test]
    fn masked_inputs_round_trip_and_wrong_sizes_are_refused() {
        let words = [0, 1, u32::MAX, 0x0102_0304];
        let bytes = masked_bytes(&words);
        assert_eq!(&bytes[12..], &[4, 3, 2, 1]);
        assert_eq!(masked_words(&bytes, 4).unwrap(), words);
        assert_eq!(masked_words(&bytes, 3), None);
        assert_eq!(masked_words(&bytes[..15], 4), None);
        assert_eq!(masked_words(&bytes, usize::MAX), None);
    }
}
