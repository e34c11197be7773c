//! Whole-round tests: clients and server wired together in memory.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::crypto;
use super::*;

const ROUND: u64 = 42;

/// What happens to one participant during a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Takes part to the end.
    Full,
    /// Its advert arrives after the advertise phase closed.
    LateAdvert,
    /// Drops before sending its shares.
    NoShares,
    /// Drops after sharing keys, before sending its masked input.
    NoMasked,
    /// Drops after sending its masked input, before unmasking.
    NoReveals,
}

struct RoundResult {
    aggregate: Aggregate,
    /// Wrapping sum of the inputs of the participants whose masked input
    /// was sent.
    expected_sum: Vec<u32>,
    expected_contributors: Vec<u32>,
}

fn wrapping_sum<'a>(len: usize, vs: impl IntoIterator<Item = &'a Vec<u32>>) -> Vec<u32> {
    let mut out = vec![0u32; len];
    for v in vs {
        for (o, x) in out.iter_mut().zip(v) {
            *o = o.wrapping_add(*x);
        }
    }
    out
}

fn random_inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random()).collect())
        .collect()
}

/// Runs a whole round; participant `p` has input `inputs[p]` and fate
/// `fates[p]`. Participant keys are `p`, so without late adverts the index
/// of `p` is `p`.
fn run_round(
    max_neighbours: u32,
    inputs: &[Vec<u32>],
    fates: &[Fate],
) -> Result<RoundResult, SecAggError> {
    let len = inputs[0].len();
    let mut server: Server<u32> = Server::new(ROUND, len);
    let mut clients = Vec::new();
    for (p, fate) in (0u32..).zip(fates) {
        let (client, c_pk, s_pk) = Client::new(ROUND)?;
        if *fate != Fate::LateAdvert {
            server.advertise(p, c_pk, s_pk)?;
        }
        clients.push((client, c_pk, s_pk));
    }
    let assignments = server.close_advertise(max_neighbours)?;
    for (p, fate) in (0u32..).zip(fates) {
        if *fate == Fate::LateAdvert {
            let (_, c_pk, s_pk) = clients[p as usize];
            let late = server.advertise(p, c_pk, s_pk).unwrap_err();
            assert!(matches!(late, SecAggError::WrongPhase { .. }), "{late}");
        }
    }

    let mut participant_of = BTreeMap::new();
    for (p, assignment) in &assignments {
        participant_of.insert(assignment.index, *p as usize);
        let shares = clients[*p as usize].0.share_keys(assignment)?;
        if fates[*p as usize] != Fate::NoShares {
            server.submit_shares(assignment.index, shares)?;
        }
    }

    let routed = server.close_shares()?;
    let mut sent = Vec::new();
    for (to, shares) in routed {
        let p = participant_of[&to];
        if fates[p] == Fate::NoMasked {
            continue;
        }
        let y = clients[p].0.masked_input(&inputs[p], shares)?;
        server.submit_masked(to, y)?;
        sent.push((to, p));
    }

    let survivors = server.close_masked()?;
    for &(index, p) in &sent {
        if fates[p] == Fate::Full {
            let reveals = clients[p].0.unmask(&survivors)?;
            server.submit_reveals(index, reveals)?;
        }
    }
    let aggregate = server.finish()?;
    Ok(RoundResult {
        aggregate,
        expected_sum: wrapping_sum(len, sent.iter().map(|&(_, p)| &inputs[p])),
        expected_contributors: sent.iter().map(|&(i, _)| i).collect(),
    })
}

fn assert_exact(r: &RoundResult) {
    assert!(r.aggregate.sum == r.expected_sum, "recovered sum differs");
    assert_eq!(r.aggregate.contributors, r.expected_contributors);
}

// --- 1. acceptance: dropouts at both stages -------------------------------

/// Client 0 drops after sharing keys; clients 1 and 2 after sending their
/// masked input. The sum is exactly that of clients 1..=9.
fn acceptance(max_neighbours: u32, expect_k: u32, expect_t: u32) {
    let inputs = random_inputs(10, 1000, 1);
    let mut fates = vec![Fate::Full; 10];
    fates[0] = Fate::NoMasked;
    fates[1] = Fate::NoReveals;
    fates[2] = Fate::NoReveals;
    let p = Params::for_cohort(10, max_neighbours).unwrap();
    assert_eq!((p.neighbours, p.threshold), (expect_k, expect_t));
    let r = run_round(max_neighbours, &inputs, &fates).unwrap();
    assert_exact(&r);
    assert_eq!(r.aggregate.contributors, (1..10).collect::<Vec<_>>());
    assert_eq!(r.expected_sum, wrapping_sum(1000, &inputs[1..]));
}

#[test]
fn acceptance_sparse_graph() {
    acceptance(8, 8, 5);
}

#[test]
fn acceptance_complete_graph() {
    acceptance(20, 9, 5);
}

#[test]
fn acceptance_sparse_k6_spread_dropouts_signed_values() {
    // k = 6, t = 4 cannot absorb three adjacent dropouts (see
    // `too_many_dropouts_names_the_client`), so here they are spread.
    let mut rng = StdRng::seed_from_u64(2);
    let signed: Vec<Vec<i32>> = (0..10)
        .map(|_| (0..1000).map(|_| rng.random_range(-1000..=1000)).collect())
        .collect();
    check_headroom(10, 1000).unwrap();
    let inputs: Vec<Vec<u32>> = signed.iter().map(|s| from_signed(s)).collect();
    let mut fates = vec![Fate::Full; 10];
    fates[0] = Fate::NoMasked;
    fates[3] = Fate::NoReveals;
    fates[6] = Fate::NoReveals;
    let r = run_round(6, &inputs, &fates).unwrap();
    assert_exact(&r);
    let expected: Vec<i32> = (0..1000)
        .map(|w| (1..10).map(|c| signed[c][w]).sum())
        .collect();
    assert_eq!(to_signed(&r.aggregate.sum), expected);
}

// --- 2. no dropouts; late advert -------------------------------------------

#[test]
fn no_dropouts_exact_sum() {
    let inputs = random_inputs(6, 100, 3);
    for max_k in [2, 4, 5] {
        let r = run_round(max_k, &inputs, &[Fate::Full; 6]).unwrap();
        assert_exact(&r);
        assert_eq!(r.aggregate.contributors, (0..6).collect::<Vec<_>>());
    }
}

#[test]
fn late_advert_is_excluded() {
    let inputs = random_inputs(8, 50, 4);
    let mut fates = vec![Fate::Full; 8];
    fates[3] = Fate::LateAdvert;
    let r = run_round(4, &inputs, &fates).unwrap();
    assert_exact(&r);
    assert_eq!(r.aggregate.contributors, (0..7).collect::<Vec<_>>());
    let without_3 = inputs
        .iter()
        .enumerate()
        .filter(|(p, _)| *p != 3)
        .map(|(_, v)| v);
    assert_eq!(r.aggregate.sum, wrapping_sum(50, without_3));
}

#[test]
fn dropping_before_sharing_is_excluded() {
    let inputs = random_inputs(9, 40, 5);
    let mut fates = vec![Fate::Full; 9];
    fates[4] = Fate::NoShares;
    let r = run_round(6, &inputs, &fates).unwrap();
    assert_exact(&r);
    assert!(!r.aggregate.contributors.contains(&4));
}

// --- 3. too many dropouts ----------------------------------------------------

#[test]
fn too_many_dropouts_names_the_client() {
    // k = 6, t = 4: with 0 dropped and 1, 2 silent, client 3's neighbours
    // {0, 1, 2, 4, 5, 6} hold only three revealed shares of b_3.
    let inputs = random_inputs(10, 20, 6);
    let mut fates = vec![Fate::Full; 10];
    fates[0] = Fate::NoMasked;
    fates[1] = Fate::NoReveals;
    fates[2] = Fate::NoReveals;
    let err = run_round(6, &inputs, &fates)
        .err()
        .expect("no sum may be returned");
    assert_eq!(
        err,
        SecAggError::NotEnoughShares {
            index: 3,
            kind: RevealKind::SelfMaskSeed,
            got: 3,
            threshold: 4
        }
    );
    assert!(err.to_string().contains("client 3"), "{err}");
}

#[test]
fn too_few_sharers_aborts() {
    let inputs = random_inputs(5, 8, 7);
    let fates = [
        Fate::Full,
        Fate::NoShares,
        Fate::NoShares,
        Fate::Full,
        Fate::Full,
    ];
    // Complete graph k = 4, t = 3: each remaining client has 2 neighbours in U2.
    let err = run_round(4, &inputs, &fates).err().unwrap();
    assert!(
        matches!(
            err,
            SecAggError::NeighbourhoodTooSmall {
                index: 0,
                have: 2,
                threshold: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn too_few_masked_inputs_aborts() {
    let inputs = random_inputs(5, 8, 8);
    let fates = [
        Fate::Full,
        Fate::NoMasked,
        Fate::NoMasked,
        Fate::Full,
        Fate::Full,
    ];
    let err = run_round(4, &inputs, &fates).err().unwrap();
    assert!(
        matches!(
            err,
            SecAggError::NeighbourhoodTooSmall {
                index: 0,
                have: 2,
                stage: "masked-input",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn too_few_participants_aborts() {
    let mut server: Server<u8> = Server::new(ROUND, 4);
    for p in 0..2 {
        let (_, c, s) = Client::new(ROUND).unwrap();
        server.advertise(p, c, s).unwrap();
    }
    assert!(matches!(
        server.close_advertise(10),
        Err(SecAggError::TooFewClients { clients: 2, .. })
    ));
    assert_eq!(server.phase(), Phase::Aborted);
    assert!(matches!(
        server.submit_shares(0, vec![]),
        Err(SecAggError::WrongPhase {
            phase: Phase::Aborted,
            ..
        })
    ));
}

// --- 4. the server's view is independent of the data ---------------------

/// Chi-square statistic of the top 4 bits of `words` against uniform.
fn chi_square_top_nibble(words: &[u32]) -> f64 {
    let counts = nibble_counts(words);
    let expected = words.len() as f64 / 16.0;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

fn nibble_counts(words: &[u32]) -> [u64; 16] {
    let mut counts = [0u64; 16];
    for w in words {
        counts[(w >> 28) as usize] += 1;
    }
    counts
}

/// Client 0's masked input in a fresh 3-client round.
fn masked_view(input: &[u32]) -> Vec<u32> {
    let mut server: Server<u32> = Server::new(ROUND, input.len());
    let mut clients = Vec::new();
    for p in 0..3 {
        let (client, c, s) = Client::new(ROUND).unwrap();
        server.advertise(p, c, s).unwrap();
        clients.push(client);
    }
    for (p, a) in server.close_advertise(2).unwrap() {
        let shares = clients[p as usize].share_keys(&a).unwrap();
        server.submit_shares(a.index, shares).unwrap();
    }
    let (to, shares) = server.close_shares().unwrap().swap_remove(0);
    assert_eq!(to, 0);
    clients[0].masked_input(input, shares).unwrap()
}

#[test]
fn masked_input_looks_uniform_whatever_the_data() {
    // 15 degrees of freedom; 56.49 is the p = 1e-6 critical value. Each of
    // the three statistics below exceeds it with probability 1e-6 when the
    // masks are uniform, so the test fails spuriously about 3 times in a
    // million runs.
    const CRITICAL: f64 = 56.49;
    const WORDS: usize = 50_000;
    let zeros = vec![0u32; WORDS];
    let large = vec![0x7fff_ffffu32; WORDS];
    let y_zero = masked_view(&zeros);
    let y_large = masked_view(&large);
    let c_zero = chi_square_top_nibble(&y_zero);
    let c_large = chi_square_top_nibble(&y_large);
    assert!(c_zero < CRITICAL, "zero input: chi2 = {c_zero}");
    assert!(c_large < CRITICAL, "large input: chi2 = {c_large}");
    // Two-sample test of homogeneity (equal sample sizes).
    let (a, b) = (nibble_counts(&y_zero), nibble_counts(&y_large));
    let two_sample: f64 = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| **x + **y > 0)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2) / (x + y) as f64)
        .sum();
    assert!(two_sample < CRITICAL, "two-sample chi2 = {two_sample}");
    // The statistic does detect structure: the raw input fails it.
    assert!(chi_square_top_nibble(&large) > 1000.0);
}

// --- 5. fewer than t shares reveal nothing ---------------------------------

#[test]
fn fewer_than_threshold_shares_are_uniform() {
    // t = 4; look at the t - 1 = 3 shares a coalition of three neighbours
    // would hold, for the all-zero and the all-0xff secret. Every share
    // byte should be uniform over GF(256) for either secret. 255 degrees of
    // freedom; 377.1 is the p = 1e-6 critical value; 12 statistics, so a
    // spurious failure about once in 80 000 runs.
    const CRITICAL: f64 = 377.1;
    const TRIALS: usize = 2048;
    let t = 4;
    let mut hist = [[[0u64; 256]; 3]; 2];
    for (s, secret) in [[0u8; 32], [0xffu8; 32]].iter().enumerate() {
        for _ in 0..TRIALS {
            let shares = crypto::split(secret, t, 3);
            for (j, share) in shares.iter().enumerate() {
                // Two byte positions per share: both equally informative.
                hist[s][j][usize::from(share[1])] += 1;
                hist[s][j][usize::from(share[32])] += 1;
            }
        }
    }
    let n = (2 * TRIALS) as f64;
    let expected = n / 256.0;
    for (s, per_secret) in hist.iter().enumerate() {
        for (j, counts) in per_secret.iter().enumerate() {
            let chi: f64 = counts
                .iter()
                .map(|&c| (c as f64 - expected).powi(2) / expected)
                .sum();
            assert!(chi < CRITICAL, "secret {s}, share {j}: chi2 = {chi}");
        }
    }
    for (j, (zero, ones)) in hist[0].iter().zip(&hist[1]).enumerate() {
        let two: f64 = zero
            .iter()
            .zip(ones)
            .filter(|(a, b)| **a + **b > 0)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2) / (a + b) as f64)
            .sum();
        assert!(two < CRITICAL, "share {j}: two-sample chi2 = {two}");
    }
}

#[test]
fn fewer_than_threshold_shares_do_not_recover() {
    let secret = crypto::random_32().unwrap();
    let shares = crypto::split(&secret, 5, 8);
    let refs: Vec<&[u8]> = shares.iter().map(|s| &s[..]).collect();
    assert_eq!(
        crypto::combine(&refs[..4], 5).unwrap_err(),
        crypto::CombineError::TooFew
    );
    // Interpolating the t - 1 shares as if the threshold were t - 1 gives a
    // value unrelated to the secret (equal with probability 2^-256).
    let guess = crypto::combine(&refs[..4], 4).unwrap();
    assert_ne!(*guess, *secret);
    assert_eq!(*crypto::combine(&refs[3..], 5).unwrap(), *secret);
}

// --- 6. refusals and rejections leave the state unchanged -----------------

/// A 5-client complete-graph round (k = 4, t = 3) driven step by step.
struct Manual {
    server: Server<u32>,
    clients: Vec<Client>,
    assignments: Vec<Assignment>,
    inputs: Vec<Vec<u32>>,
}

const LEN: usize = 16;

fn manual() -> Manual {
    let mut server = Server::new(ROUND, LEN);
    let mut clients = Vec::new();
    for p in 0..5 {
        let (client, c, s) = Client::new(ROUND).unwrap();
        server.advertise(p, c, s).unwrap();
        clients.push(client);
    }
    let assignments = server
        .close_advertise(4)
        .unwrap()
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    Manual {
        server,
        clients,
        assignments,
        inputs: random_inputs(5, LEN, 9),
    }
}

#[test]
fn server_rejects_bad_adverts_without_changing_state() {
    let mut server: Server<&str> = Server::new(ROUND, LEN);
    let (_, c, s) = Client::new(ROUND).unwrap();
    server.advertise("a", c, s).unwrap();
    let (_, c2, s2) = Client::new(ROUND).unwrap();
    assert_eq!(
        server.advertise("a", c2, s2),
        Err(SecAggError::DuplicateParticipant)
    );
    assert_eq!(
        server.advertise("b", c, s2),
        Err(SecAggError::AdvertKeyReused)
    );
    assert_eq!(
        server.advertise("b", c2, c2),
        Err(SecAggError::AdvertKeyReused)
    );
    assert_eq!(
        server.advertise("b", [0; 32], s2),
        Err(SecAggError::AdvertLowOrderKey)
    );
    assert!(matches!(
        server.submit_masked(0, vec![0; LEN]),
        Err(SecAggError::WrongPhase {
            phase: Phase::Advertise,
            ..
        })
    ));
    server.advertise("b", c2, s2).unwrap();
    let (_, c3, s3) = Client::new(ROUND).unwrap();
    server.advertise("c", c3, s3).unwrap();
    let assigned = server.close_advertise(2).unwrap();
    let order: Vec<(&str, u32)> = assigned.iter().map(|(p, a)| (*p, a.index)).collect();
    assert_eq!(order, vec![("a", 0), ("b", 1), ("c", 2)]);
    assert_eq!(server.phase(), Phase::ShareKeys);
    assert!(matches!(
        server.close_advertise(2),
        Err(SecAggError::WrongPhase {
            phase: Phase::ShareKeys,
            ..
        })
    ));
    assert!(format!("{server:?}").contains("ShareKeys"));
}

#[test]
fn client_checks_its_assignment() {
    let mut m = manual();
    let good = m.assignments[1].clone();
    let client = &mut m.clients[1];

    let mut bad = good.clone();
    bad.index = 2;
    assert_eq!(
        client.share_keys(&bad),
        Err(SecAggError::AssignmentOwnKeys { index: 2 })
    );
    let mut bad = good.clone();
    bad.own.c_pk = good.neighbours[0].c_pk;
    assert_eq!(
        client.share_keys(&bad),
        Err(SecAggError::AssignmentOwnKeys { index: 1 })
    );
    let mut bad = good.clone();
    bad.neighbours.swap(0, 1);
    assert!(matches!(
        client.share_keys(&bad),
        Err(SecAggError::AssignmentNeighbours { index: 1, .. })
    ));
    let mut bad = good.clone();
    bad.neighbours[2].s_pk = good.own.c_pk;
    assert_eq!(
        client.share_keys(&bad),
        Err(SecAggError::DuplicateKey { index: 3, other: 1 })
    );
    let mut bad = good.clone();
    bad.neighbours[0].c_pk = [0; 32];
    assert_eq!(
        client.share_keys(&bad),
        Err(SecAggError::LowOrderKey { peer: 0 })
    );
    let mut bad = good.clone();
    bad.params.threshold = 2;
    assert!(matches!(
        client.share_keys(&bad),
        Err(SecAggError::ThresholdTooLow { .. })
    ));
    let mut bad = good.clone();
    bad.index = 9;
    bad.own.index = 9;
    assert_eq!(
        client.share_keys(&bad),
        Err(SecAggError::IndexOutOfRange {
            index: 9,
            clients: 5
        })
    );
    assert!(matches!(
        client.unmask(&Survivors::default()),
        Err(SecAggError::WrongClientPhase {
            phase: ClientPhase::ShareKeys,
            ..
        })
    ));

    assert_eq!(client.phase(), ClientPhase::ShareKeys);
    let shares = client.share_keys(&good).unwrap();
    assert_eq!(shares.len(), 4);
    assert_eq!(client.phase(), ClientPhase::MaskedInput);
    assert!(matches!(
        client.share_keys(&good),
        Err(SecAggError::WrongClientPhase {
            phase: ClientPhase::MaskedInput,
            ..
        })
    ));
    let debug = format!("{client:?}");
    assert!(debug.contains("index: Some(1)"), "{debug}");
}

#[test]
fn server_rejects_bad_submissions_and_still_completes() {
    let mut m = manual();
    let mut shares: Vec<Vec<EncryptedShare>> = Vec::new();
    for (client, a) in m.clients.iter_mut().zip(&m.assignments) {
        shares.push(client.share_keys(a).unwrap());
    }
    let s = &mut m.server;

    // Share phase.
    assert!(matches!(
        s.submit_masked(0, vec![0; LEN]),
        Err(SecAggError::WrongPhase { .. })
    ));
    assert_eq!(
        s.submit_shares(7, shares[0].clone()),
        Err(SecAggError::IndexOutOfRange {
            index: 7,
            clients: 5
        })
    );
    assert_eq!(
        s.submit_shares(1, shares[0].clone()),
        Err(SecAggError::SenderMismatch {
            from: 1,
            claimed: 0
        })
    );
    assert_eq!(
        s.submit_shares(0, shares[0][..3].to_vec()),
        Err(SecAggError::ShareCount {
            from: 0,
            expected: 4,
            got: 3
        })
    );
    let mut dup = shares[0].clone();
    dup[1] = dup[0].clone();
    assert_eq!(
        s.submit_shares(0, dup),
        Err(SecAggError::DuplicateShare { from: 0, to: 1 })
    );
    let mut to_self = shares[0].clone();
    to_self[0].to = 0;
    assert_eq!(
        s.submit_shares(0, to_self),
        Err(SecAggError::NotNeighbour { from: 0, to: 0 })
    );
    let mut short = shares[0].clone();
    short[2].ciphertext.pop();
    assert!(matches!(
        s.submit_shares(0, short),
        Err(SecAggError::CiphertextLength { from: 0, to: 3, .. })
    ));
    for (i, sh) in shares.iter().enumerate() {
        s.submit_shares(i as u32, sh.clone()).unwrap();
    }
    assert_eq!(
        s.submit_shares(0, shares[0].clone()),
        Err(SecAggError::AlreadySubmitted {
            index: 0,
            phase: Phase::ShareKeys
        })
    );
    let routed = s.close_shares().unwrap();
    assert_eq!(routed.len(), 5);
    assert!(routed
        .iter()
        .all(|(to, v)| v.len() == 4 && v.iter().all(|e| e.to == *to)));
    assert!(matches!(
        s.submit_shares(0, shares[0].clone()),
        Err(SecAggError::WrongPhase { .. })
    ));

    // Masked-input phase.
    let mut masked = Vec::new();
    for ((client, (_, inbox)), input) in m.clients.iter_mut().zip(routed).zip(&m.inputs) {
        masked.push(client.masked_input(input, inbox).unwrap());
    }
    assert_eq!(
        s.submit_masked(0, vec![0; LEN - 1]),
        Err(SecAggError::VectorLength {
            index: 0,
            expected: LEN,
            got: LEN - 1
        })
    );
    assert_eq!(
        s.submit_masked(5, masked[0].clone()),
        Err(SecAggError::IndexOutOfRange {
            index: 5,
            clients: 5
        })
    );
    for (i, y) in masked.iter().enumerate() {
        s.submit_masked(i as u32, y.clone()).unwrap();
    }
    assert_eq!(
        s.submit_masked(2, masked[2].clone()),
        Err(SecAggError::AlreadySubmitted {
            index: 2,
            phase: Phase::MaskedInput
        })
    );
    let survivors = s.close_masked().unwrap();
    assert_eq!(survivors.survivors, vec![0, 1, 2, 3, 4]);
    assert!(survivors.dropped.is_empty());
    assert!(matches!(
        s.submit_masked(0, masked[0].clone()),
        Err(SecAggError::WrongPhase {
            phase: Phase::Unmask,
            ..
        })
    ));

    // Unmask phase.
    let reveals: Vec<Vec<Reveal>> = m
        .clients
        .iter_mut()
        .map(|c| c.unmask(&survivors).unwrap())
        .collect();
    let mut wrong_kind = reveals[0].clone();
    wrong_kind[0].kind = RevealKind::MaskKey;
    assert_eq!(
        s.submit_reveals(0, wrong_kind),
        Err(SecAggError::WrongRevealKind {
            from: 0,
            about: 1,
            expected: RevealKind::SelfMaskSeed
        })
    );
    let mut bad_x = reveals[0].clone();
    bad_x[1].share[0] ^= 1;
    assert_eq!(
        s.submit_reveals(0, bad_x),
        Err(SecAggError::MalformedReveal { from: 0, about: 2 })
    );
    let mut short = reveals[0].clone();
    short[1].share.truncate(1);
    assert_eq!(
        s.submit_reveals(0, short),
        Err(SecAggError::MalformedReveal { from: 0, about: 2 })
    );
    let mut empty = reveals[0].clone();
    empty[1].share.clear();
    assert_eq!(
        s.submit_reveals(0, empty),
        Err(SecAggError::MalformedReveal { from: 0, about: 2 })
    );
    let mut dup = reveals[0].clone();
    dup[1] = dup[0].clone();
    assert_eq!(
        s.submit_reveals(0, dup),
        Err(SecAggError::DuplicateReveal { from: 0, about: 1 })
    );
    let mut about_self = reveals[0].clone();
    about_self[0].about = 0;
    assert_eq!(
        s.submit_reveals(0, about_self),
        Err(SecAggError::RevealNotExpected { from: 0, about: 0 })
    );
    assert_eq!(
        s.submit_reveals(1, reveals[0].clone()),
        Err(SecAggError::SenderMismatch {
            from: 1,
            claimed: 0
        })
    );
    assert_eq!(
        s.submit_reveals(0, reveals[0][..3].to_vec()),
        Err(SecAggError::RevealCount {
            from: 0,
            expected: 4,
            got: 3
        })
    );
    for (i, r) in reveals.iter().enumerate() {
        s.submit_reveals(i as u32, r.clone()).unwrap();
    }
    assert_eq!(
        s.submit_reveals(3, reveals[3].clone()),
        Err(SecAggError::AlreadySubmitted {
            index: 3,
            phase: Phase::Unmask
        })
    );
    let agg = m.server.finish().unwrap();
    assert_eq!(agg.sum, wrapping_sum(LEN, &m.inputs));
    assert_eq!(agg.contributors, vec![0, 1, 2, 3, 4]);
}

/// Drives a manual round up to the survivor lists, with `drop` sending no
/// masked input.
fn manual_to_unmask(drop: Option<u32>) -> (Manual, Survivors) {
    let mut m = manual();
    for (i, (client, a)) in m.clients.iter_mut().zip(&m.assignments).enumerate() {
        let shares = client.share_keys(a).unwrap();
        m.server.submit_shares(i as u32, shares).unwrap();
    }
    for (to, inbox) in m.server.close_shares().unwrap() {
        let y = m.clients[to as usize]
            .masked_input(&m.inputs[to as usize], inbox)
            .unwrap();
        if Some(to) != drop {
            m.server.submit_masked(to, y).unwrap();
        }
    }
    let survivors = m.server.close_masked().unwrap();
    (m, survivors)
}

#[test]
fn client_refuses_inconsistent_survivor_lists() {
    let (mut m, honest) = manual_to_unmask(Some(4));
    assert_eq!(honest.survivors, vec![0, 1, 2, 3]);
    assert_eq!(honest.dropped, vec![4]);
    let client = &mut m.clients[0];
    let cases: Vec<(Survivors, SecAggError)> = vec![
        (
            Survivors {
                survivors: vec![0, 1, 2, 3, 4],
                dropped: vec![4],
            },
            SecAggError::ListedAsBoth { index: 4 },
        ),
        (
            Survivors {
                survivors: vec![1, 2, 3],
                dropped: vec![0, 4],
            },
            SecAggError::SelfDropped { index: 0 },
        ),
        (
            Survivors {
                survivors: vec![1, 2, 3],
                dropped: vec![4],
            },
            SecAggError::SelfNotSurvivor { index: 0 },
        ),
        (
            Survivors {
                survivors: vec![0, 1, 1, 2, 3],
                dropped: vec![4],
            },
            SecAggError::DuplicateInList {
                index: 1,
                list: "survivors",
            },
        ),
        (
            Survivors {
                survivors: vec![0, 1, 2, 3],
                dropped: vec![9],
            },
            SecAggError::IndexOutOfRange {
                index: 9,
                clients: 5,
            },
        ),
        (
            Survivors {
                survivors: vec![0, 1, 2, 3],
                dropped: vec![],
            },
            SecAggError::InconsistentLists {
                index: 0,
                neighbour: 4,
                reason: "shared keys but is in neither list",
            },
        ),
        (
            // Two neighbours "dropped": only 2 < t = 3 survive around 0.
            Survivors {
                survivors: vec![0, 1, 2],
                dropped: vec![3, 4],
            },
            SecAggError::NeighbourhoodTooSmall {
                index: 0,
                stage: "masked-input",
                have: 2,
                threshold: 3,
            },
        ),
    ];
    for (lists, expected) in cases {
        assert_eq!(client.unmask(&lists).unwrap_err(), expected, "{lists:?}");
        assert_eq!(client.phase(), ClientPhase::Unmask);
    }
    // Still able to answer the honest lists, exactly once.
    let reveals = client.unmask(&honest).unwrap();
    let kinds: Vec<(u32, RevealKind)> = reveals.iter().map(|r| (r.about, r.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (1, RevealKind::SelfMaskSeed),
            (2, RevealKind::SelfMaskSeed),
            (3, RevealKind::SelfMaskSeed),
            (4, RevealKind::MaskKey),
        ]
    );
    assert!(matches!(
        client.unmask(&honest),
        Err(SecAggError::WrongClientPhase { .. })
    ));

    // A dropped client may not reveal; finishing needs the others.
    assert_eq!(
        m.server.submit_reveals(4, vec![]),
        Err(SecAggError::NotSurvivor { index: 4 })
    );
    m.server.submit_reveals(0, reveals).unwrap();
    for i in 1..4 {
        let r = m.clients[i].unmask(&honest).unwrap();
        m.server.submit_reveals(i as u32, r).unwrap();
    }
    let agg = m.server.finish().unwrap();
    assert_eq!(agg.sum, wrapping_sum(LEN, &m.inputs[..4]));
}

#[test]
fn corrupted_reveals_are_detected() {
    // Survivors: 4 shares of each b_u with t = 3, so one bad share shows.
    let (mut m, lists) = manual_to_unmask(None);
    for i in 0..5 {
        let mut r = m.clients[i].unmask(&lists).unwrap();
        if i == 2 {
            r[0].share[7] ^= 0x40; // about client 0
        }
        m.server.submit_reveals(i as u32, r).unwrap();
    }
    assert_eq!(
        m.server.finish().unwrap_err(),
        SecAggError::InconsistentShares {
            index: 0,
            kind: RevealKind::SelfMaskSeed
        }
    );

    // A dropped client's key is checked against its advert.
    let (mut m, lists) = manual_to_unmask(Some(4));
    for i in 0..4 {
        let mut r = m.clients[i].unmask(&lists).unwrap();
        if i == 1 {
            let last = r.len() - 1;
            assert_eq!(r[last].kind, RevealKind::MaskKey);
            r[last].share[3] ^= 1;
        }
        m.server.submit_reveals(i as u32, r).unwrap();
    }
    assert!(matches!(
        m.server.finish().unwrap_err(),
        SecAggError::KeyMismatch { index: 4 } | SecAggError::InconsistentShares { index: 4, .. }
    ));
}

#[test]
fn finish_before_unmask_is_an_error() {
    let m = manual();
    assert!(matches!(
        m.server.finish(),
        Err(SecAggError::WrongPhase {
            op: "finish",
            phase: Phase::ShareKeys
        })
    ));
}

// --- 7. tampered or misrouted shares ----------------------------------------

#[test]
fn tampered_shares_are_rejected_at_masked_input() {
    let mut m = manual();
    for (i, (client, a)) in m.clients.iter_mut().zip(&m.assignments).enumerate() {
        let shares = client.share_keys(a).unwrap();
        m.server.submit_shares(i as u32, shares).unwrap();
    }
    let routed = m.server.close_shares().unwrap();
    let inbox = routed[0].1.clone();
    let client = &mut m.clients[0];
    let input = &m.inputs[0];

    let mut flipped = inbox.clone();
    flipped[1].ciphertext[30] ^= 1;
    assert_eq!(
        client.masked_input(input, flipped),
        Err(SecAggError::DecryptFailed { from: 2, to: 0 })
    );
    let mut swapped = inbox.clone();
    let c1 = swapped[1].ciphertext.clone();
    swapped[1].ciphertext = swapped[2].ciphertext.clone();
    swapped[2].ciphertext = c1;
    assert_eq!(
        client.masked_input(input, swapped),
        Err(SecAggError::DecryptFailed { from: 2, to: 0 })
    );
    let mut garbage = inbox.clone();
    garbage[0].ciphertext = vec![0xee; 94];
    assert_eq!(
        client.masked_input(input, garbage),
        Err(SecAggError::DecryptFailed { from: 1, to: 0 })
    );
    let mut truncated = inbox.clone();
    truncated[0].ciphertext.truncate(10);
    assert!(matches!(
        client.masked_input(input, truncated),
        Err(SecAggError::CiphertextLength {
            from: 1,
            to: 0,
            len: 10,
            ..
        })
    ));
    let mut misaddressed = inbox.clone();
    misaddressed[0].to = 3;
    assert_eq!(
        client.masked_input(input, misaddressed),
        Err(SecAggError::WrongRecipient { to: 3, me: 0 })
    );
    let mut from_self = inbox.clone();
    from_self[0].from = 0;
    assert_eq!(
        client.masked_input(input, from_self),
        Err(SecAggError::NotNeighbour { from: 0, to: 0 })
    );
    let mut dup = inbox.clone();
    dup[1] = dup[0].clone();
    assert_eq!(
        client.masked_input(input, dup),
        Err(SecAggError::DuplicateShare { from: 1, to: 0 })
    );
    assert_eq!(
        client.masked_input(input, inbox[..2].to_vec()),
        Err(SecAggError::NeighbourhoodTooSmall {
            index: 0,
            stage: "share-keys",
            have: 2,
            threshold: 3
        })
    );
    assert_eq!(
        client.masked_input(&input[1..], inbox.clone()),
        Err(SecAggError::VectorLength {
            index: 0,
            expected: LEN,
            got: LEN - 1
        })
    );
    // Nothing was sent; the genuine shares still work, once.
    assert_eq!(client.phase(), ClientPhase::MaskedInput);
    let y = client.masked_input(input, inbox.clone()).unwrap();
    assert_eq!(y.len(), LEN);
    assert!(matches!(
        client.masked_input(input, inbox),
        Err(SecAggError::WrongClientPhase {
            phase: ClientPhase::Unmask,
            ..
        })
    ));
}

// --- 8. property: any survivable dropout pattern gives the exact sum ------

/// Whether the round with these fates must complete, by the dropout rule in
/// the module docs (stated independently of the server code).
fn survivable(max_neighbours: u32, fates: &[Fate]) -> bool {
    let present: Vec<Fate> = fates
        .iter()
        .copied()
        .filter(|f| *f != Fate::LateAdvert)
        .collect();
    let Ok(params) = Params::for_cohort(present.len() as u32, max_neighbours) else {
        return false;
    };
    let t = params.threshold as usize;
    let idx = |f: &dyn Fn(Fate) -> bool| -> Vec<bool> { present.iter().map(|&x| f(x)).collect() };
    let u2 = idx(&|f| f != Fate::NoShares);
    let u3 = idx(&|f| f == Fate::Full || f == Fate::NoReveals);
    let revealers = idx(&|f| f == Fate::Full);
    let count = |set: &[bool], i: u32| {
        params
            .neighbours_of(i)
            .iter()
            .filter(|&&j| set[j as usize])
            .count()
    };
    let n = present.len() as u32;
    let all =
        |set: &[bool], pred: &dyn Fn(u32) -> bool| (0..n).filter(|&i| set[i as usize]).all(pred);
    let dropped: Vec<bool> = (0..present.len()).map(|i| u2[i] && !u3[i]).collect();
    u2.contains(&true)
        && all(&u2, &|i| count(&u2, i) >= t)
        && u3.contains(&true)
        && all(&u3, &|i| count(&u3, i) >= t)
        && all(&dropped, &|d| count(&u3, d) == 0 || count(&u3, d) >= t)
        && all(&u3, &|i| count(&revealers, i) >= t)
        && all(&dropped, &|d| {
            count(&u3, d) == 0 || count(&revealers, d) >= t
        })
}

fn fate_strategy() -> impl Strategy<Value = Fate> {
    prop_oneof![
        9 => Just(Fate::Full),
        1 => Just(Fate::LateAdvert),
        1 => Just(Fate::NoShares),
        1 => Just(Fate::NoMasked),
        1 => Just(Fate::NoReveals),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn recovered_sum_is_exact_whenever_the_round_is_survivable(
        fates in prop::collection::vec(fate_strategy(), 3..12),
        max_neighbours in 2u32..12,
        len in 1usize..64,
        seed in any::<u64>(),
    ) {
        let inputs = random_inputs(fates.len(), len, seed);
        let outcome = run_round(max_neighbours, &inputs, &fates);
        let expect_ok = survivable(max_neighbours, &fates);
        match outcome {
            Ok(r) => {
                prop_assert!(expect_ok, "completed although the model says it cannot");
                prop_assert_eq!(&r.aggregate.sum, &r.expected_sum);
                prop_assert_eq!(&r.aggregate.contributors, &r.expected_contributors);
            }
            Err(e) => {
                prop_assert!(!expect_ok, "failed although survivable: {}", e);
                prop_assert!(
                    matches!(
                        e,
                        SecAggError::NeighbourhoodTooSmall { .. }
                            | SecAggError::NoneLeft { .. }
                            | SecAggError::NotEnoughShares { .. }
                            | SecAggError::TooFewClients { .. }
                    ),
                    "unexpected error kind: {}", e
                );
            }
        }
    }
}
