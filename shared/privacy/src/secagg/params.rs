//! Round parameters, the neighbour graph and the signed embedding of sums.

use super::error::SecAggError;

/// Smallest cohort: with two clients the sum plus one's own input is the
/// other's input, and the graph rules below (k >= 2, k <= n - 1) need n >= 3.
pub const MIN_CLIENTS: u32 = 3;
/// Largest cohort. Keeps every index in a `u16` and bounds the server's
/// per-round bookkeeping; far beyond what one aggregation round should hold.
pub const MAX_CLIENTS: u32 = 65_535;
/// Fewest neighbours: with one neighbour the threshold is 1, so that single
/// neighbour holds both secrets of the client outright.
pub const MIN_NEIGHBOURS: u32 = 2;
/// Most neighbours. Shamir shares live in GF(256), which has 255 non-zero
/// x-coordinates, so at most 255 shares exist per secret; 254 is the largest
/// even value, which is what the sparse ring graph needs.
pub const MAX_NEIGHBOURS: u32 = 254;

/// The shape of one aggregation round: how many clients, how many neighbours
/// each has in the masking graph, and how many neighbours must cooperate to
/// reconstruct a client's secret.
///
/// The fields are public so a transport can carry them, but a value received
/// from elsewhere must be re-checked with [`Params::new`]; the protocol code
/// does this itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// `n`: clients are numbered `0..n`.
    pub clients: u32,
    /// `k`: the size of every client's neighbourhood.
    pub neighbours: u32,
    /// `t`: shares needed to reconstruct a secret of one client.
    pub threshold: u32,
}

impl Params {
    /// Checks the rules below and returns the parameters.
    ///
    /// - `3 <= n <= 65_535` (see [`MIN_CLIENTS`], [`MAX_CLIENTS`]);
    /// - `2 <= k <= 254` and `k <= n - 1` (see [`MIN_NEIGHBOURS`],
    ///   [`MAX_NEIGHBOURS`]; a client cannot be its own neighbour);
    /// - `k` even unless `k == n - 1`: the sparse graph is a ring where each
    ///   client is joined to the `k/2` nearest indices on either side;
    ///   `k == n - 1` is the complete graph (Bonawitz et al. 2017);
    /// - `k/2 < t <= k`: the server must never collect `t` shares of both
    ///   secrets of one client. Every honest neighbour reveals at most one of
    ///   the two shares it holds about a client, so a majority threshold
    ///   means even a server that lies about who dropped out cannot get `t`
    ///   of each from honest neighbours (`2t > k`). `t <= k` so that the
    ///   secret can be reconstructed at all.
    pub fn new(clients: u32, neighbours: u32, threshold: u32) -> Result<Params, SecAggError> {
        if clients < MIN_CLIENTS {
            return Err(SecAggError::TooFewClients {
                clients,
                min: MIN_CLIENTS,
            });
        }
        if clients > MAX_CLIENTS {
            return Err(SecAggError::TooManyClients {
                clients,
                max: MAX_CLIENTS,
            });
        }
        if neighbours < MIN_NEIGHBOURS {
            return Err(SecAggError::TooFewNeighbours {
                neighbours,
                min: MIN_NEIGHBOURS,
            });
        }
        if neighbours > MAX_NEIGHBOURS {
            return Err(SecAggError::TooManyNeighbours {
                neighbours,
                max: MAX_NEIGHBOURS,
            });
        }
        if neighbours > clients - 1 {
            return Err(SecAggError::NeighboursExceedCohort {
                neighbours,
                clients,
            });
        }
        if neighbours % 2 == 1 && neighbours != clients - 1 {
            return Err(SecAggError::OddNeighbours {
                neighbours,
                clients,
            });
        }
        if threshold <= neighbours / 2 {
            return Err(SecAggError::ThresholdTooLow {
                threshold,
                neighbours,
            });
        }
        if threshold > neighbours {
            return Err(SecAggError::ThresholdTooHigh {
                threshold,
                neighbours,
            });
        }
        Ok(Params {
            clients,
            neighbours,
            threshold,
        })
    }

    /// Parameters for a cohort of `clients`, with at most `max_neighbours`
    /// neighbours each.
    ///
    /// `k` is `max_neighbours` rounded down to even (the ring graph needs an
    /// even degree), capped at [`MAX_NEIGHBOURS`]; if that reaches `n - 1`
    /// the graph is complete and `k = n - 1`. `t = floor(k/2) + 1`, the
    /// smallest majority: any `t` neighbours can reconstruct, so the round
    /// survives up to `k - t` dropouts per neighbourhood, while the server
    /// can never hold a majority for both secrets of one client (see
    /// [`Params::new`]).
    pub fn for_cohort(clients: u32, max_neighbours: u32) -> Result<Params, SecAggError> {
        let even = (max_neighbours & !1).min(MAX_NEIGHBOURS);
        let neighbours = if even >= clients.saturating_sub(1) {
            clients.saturating_sub(1)
        } else {
            even
        };
        Params::new(clients, neighbours, neighbours / 2 + 1)
    }

    /// True when every client is every other client's neighbour.
    pub fn is_complete(&self) -> bool {
        self.neighbours >= self.clients.saturating_sub(1)
    }

    /// The sorted neighbours of client `i`: the `k/2` nearest indices on each
    /// side around the ring `0..n` (a Harary graph), or everyone else in the
    /// complete graph. Empty when `i` is out of range.
    pub fn neighbours_of(&self, i: u32) -> Vec<u32> {
        let n = self.clients;
        if i >= n {
            return Vec::new();
        }
        if self.is_complete() {
            return (0..n).filter(|&j| j != i).collect();
        }
        let half = self.neighbours / 2;
        let mut out = Vec::with_capacity(2 * half as usize);
        for d in 1..=half {
            // u64 so that even unchecked values cannot overflow.
            out.push(((u64::from(i) + u64::from(d)) % u64::from(n)) as u32);
            out.push(((u64::from(i) + u64::from(n) - u64::from(d)) % u64::from(n)) as u32);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The position of `j` in `neighbours_of(i)`, if `j` is a neighbour.
    /// Constant time: no list is built.
    pub fn neighbour_position(&self, i: u32, j: u32) -> Option<usize> {
        if !self.are_neighbours(i, j) {
            return None;
        }
        if self.is_complete() {
            return Some(if j < i { j } else { j - 1 } as usize);
        }
        // `i` with its neighbours is the circular interval [i - h, i + h] of
        // 2h + 1 < n indices. Count its members below `j`, less `i` itself.
        let (n, h) = (u64::from(self.clients), u64::from(self.neighbours / 2));
        let (i, j) = (u64::from(i), u64::from(j));
        let lo = (i + n - h) % n;
        let len = 2 * h + 1;
        let below = if lo + len <= n {
            j.saturating_sub(lo).min(len)
        } else {
            j.saturating_sub(lo).min(n - lo) + j.min(lo + len - n)
        };
        Some((below - u64::from(i < j)) as usize)
    }

    /// Whether `i` and `j` are neighbours (the graph is symmetric).
    pub fn are_neighbours(&self, i: u32, j: u32) -> bool {
        i != j && i < self.clients && j < self.clients && {
            if self.is_complete() {
                true
            } else {
                let d = i.abs_diff(j);
                let ring = d.min(self.clients - d);
                ring <= self.neighbours / 2
            }
        }
    }
}

/// Checks that the signed sum of `clients` inputs, each of absolute value at
/// most `max_abs_per_client`, fits in an `i32` (`n * max_abs < 2^31`).
///
/// The protocol sums modulo 2^32; a configuration that fails this check would
/// wrap silently, so the caller should refuse it before the round starts.
pub fn check_headroom(clients: u32, max_abs_per_client: u64) -> Result<(), SecAggError> {
    let total = u128::from(clients) * u128::from(max_abs_per_client);
    if total < 1u128 << 31 {
        Ok(())
    } else {
        Err(SecAggError::HeadroomExceeded {
            clients,
            max_abs_per_client,
        })
    }
}

/// Reads each word of a sum as a two's-complement `i32`.
pub fn to_signed(sum: &[u32]) -> Vec<i32> {
    sum.iter().map(|&w| w as i32).collect()
}

/// Embeds signed values into `Z_{2^32}` (two's complement), the inverse of
/// [`to_signed`].
pub fn from_signed(x: &[i32]) -> Vec<u32> {
    x.iter().map(|&v| v as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages() {
        let cases: &[((u32, u32, u32), &str)] = &[
            ((2, 1, 1), "at least 3 clients"),
            ((65_536, 10, 6), "at most 65535 clients"),
            ((10, 1, 1), "at least 2 neighbours"),
            ((1000, 256, 129), "at most 254 neighbours"),
            ((5, 5, 3), "5 neighbours but only 5 clients"),
            ((10, 5, 3), "5 neighbours is odd"),
            ((10, 6, 3), "threshold 3 is not a majority of 6 neighbours"),
            ((10, 6, 7), "threshold 7 exceeds 6 neighbours"),
        ];
        for &((n, k, t), needle) in cases {
            let err = Params::new(n, k, t).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{n}/{k}/{t}: {err:?} lacks {needle:?}"
            );
        }
        assert!(Params::new(3, 2, 2).is_ok());
        assert!(Params::new(10, 9, 5).is_ok()); // complete, odd k
        assert!(Params::new(256, 254, 128).is_ok());
        assert!(Params::new(65_535, 254, 254).is_ok());
    }

    #[test]
    fn for_cohort_choices() {
        let p = Params::for_cohort(100, 20).unwrap();
        assert_eq!((p.neighbours, p.threshold), (20, 11));
        let p = Params::for_cohort(100, 21).unwrap();
        assert_eq!((p.neighbours, p.threshold), (20, 11));
        let p = Params::for_cohort(10, 20).unwrap();
        assert_eq!((p.neighbours, p.threshold), (9, 5));
        assert!(p.is_complete());
        let p = Params::for_cohort(3, 2).unwrap();
        assert_eq!((p.neighbours, p.threshold), (2, 2));
        let p = Params::for_cohort(1000, 1000).unwrap();
        assert_eq!((p.neighbours, p.threshold), (254, 128));
        assert!(matches!(
            Params::for_cohort(2, 10),
            Err(SecAggError::TooFewClients { .. })
        ));
        assert!(matches!(
            Params::for_cohort(10, 1),
            Err(SecAggError::TooFewNeighbours { .. })
        ));
    }

    #[test]
    fn ring_graph_is_symmetric_and_regular() {
        for (n, k) in [
            (3, 2),
            (7, 4),
            (10, 6),
            (10, 8),
            (10, 9),
            (11, 10),
            (50, 20),
        ] {
            let p = Params::for_cohort(n, k).unwrap();
            for i in 0..n {
                let ns = p.neighbours_of(i);
                assert_eq!(ns.len() as u32, p.neighbours, "n={n} k={k} i={i}");
                assert!(ns.windows(2).all(|w| w[0] < w[1]));
                assert!(!ns.contains(&i));
                for &j in &ns {
                    assert!(p.neighbours_of(j).contains(&i));
                    assert!(p.are_neighbours(i, j));
                }
                for j in 0..n {
                    assert_eq!(p.are_neighbours(i, j), ns.contains(&j));
                    assert_eq!(p.neighbour_position(i, j), ns.iter().position(|&x| x == j));
                }
            }
            assert!(p.neighbours_of(n).is_empty());
        }
        let p = Params::new(10, 6, 4).unwrap();
        assert_eq!(p.neighbours_of(0), vec![1, 2, 3, 7, 8, 9]);
        assert_eq!(p.neighbour_position(0, 7), Some(3));
        assert_eq!(p.neighbour_position(0, 5), None);
    }

    #[test]
    fn unchecked_params_do_not_panic() {
        let p = Params {
            clients: 0,
            neighbours: 0,
            threshold: 0,
        };
        assert!(p.neighbours_of(0).is_empty());
        assert!(!p.are_neighbours(0, 1));
        assert_eq!(p.neighbour_position(0, 1), None);
        let p = Params {
            clients: u32::MAX,
            neighbours: 7,
            threshold: 0,
        };
        assert_eq!(p.neighbours_of(u32::MAX - 1).len(), 6);
        assert_eq!(p.neighbour_position(u32::MAX - 1, 1), Some(1));
        assert_eq!(p.neighbour_position(u32::MAX - 1, u32::MAX - 4), Some(3));
    }

    #[test]
    fn headroom_and_signed_embedding() {
        assert!(check_headroom(100, (1 << 31) / 100 - 1).is_ok());
        assert!(check_headroom(100, (1 << 31) / 100 + 1).is_err());
        assert!(check_headroom(u32::MAX, u64::MAX).is_err());
        assert!(check_headroom(0, u64::MAX).is_ok());
        let xs = [0, 1, -1, i32::MAX, i32::MIN, -12345];
        assert_eq!(to_signed(&from_signed(&xs)), xs);
        assert_eq!(from_signed(&[-1]), vec![u32::MAX]);
        // A signed sum computed mod 2^32 reads back correctly.
        let a = from_signed(&[-5, 7]);
        let b = from_signed(&[3, -9]);
        let s: Vec<u32> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y)).collect();
        assert_eq!(to_signed(&s), vec![-2, -2]);
    }
}
