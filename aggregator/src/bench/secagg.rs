//! `aggregator bench secagg`: one SecAgg+ round of `--clients` devices over a
//! `--parameters`-value delta, in process (the protocol's compute and the protobuf bytes each
//! message would carry; no sockets), with `--dropout` of the devices vanishing after sharing
//! keys (the server's costliest case: it must rebuild their mask keys). Beside it, the
//! reference measured in the same run: the plain path for the same updates (q8 encode on the
//! device, decode + validate + add at the aggregator). Then the DP noise samplers' cost per
//! parameter on all cores.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fedpersona_privacy::codec::{self, DecodeLimits, Encoding};
use fedpersona_privacy::mode;
use fedpersona_privacy::noise;
use fedpersona_privacy::protect::{quantize, QuantizationSpec};
use fedpersona_privacy::secagg::{Client, Server};
use fedpersona_privacy::tensors::AdapterTensors;
use fedpersona_proto::v1 as pb;
use prost::Message;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::aggregate::{RunningSum, UpdateSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct SecaggArgs {
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Values in the delta.
    #[arg(long, default_value_t = 100_000)]
    pub parameters: usize,
    #[arg(long, default_value_t = 20)]
    pub max_neighbours: u32,
    /// Fraction of the devices that vanish after sharing keys.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Noise multiplier of the distributed noise (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub noise_multiplier: f64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Costs {
    pub ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Serialize)]
pub struct SecaggReport {
    pub clients: u32,
    pub parameters: usize,
    pub neighbours: u32,
    pub threshold: u32,
    pub dropped: usize,
    /// Per surviving device, mean: quantization with its noise share.
    pub client_quantize_ms: f64,
    /// Per surviving device, mean: the protocol (keys, shares, masking, reveals) and bytes.
    pub client: Costs,
    /// Aggregator: every phase's work (routing, summing, unmasking) and bytes.
    pub server: Costs,
    pub server_finish_ms: f64,
    /// Reference, same updates: q8 encode per device (mean), decode + validate + add of all.
    pub plain_client_ms: f64,
    pub plain_client_bytes: u64,
    pub plain_server_ms: f64,
    /// Noise sampling on all cores, per parameter.
    pub discrete_gaussian_ns_per_param: f64,
    pub float_gaussian_ns_per_param: f64,
    pub threads: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: &SecaggArgs) -> anyhow::Result<String> {
    let r = measure(args)?;
    if args.json {
        return Ok(serde_json::to_string(&r)?);
    }
    Ok(format!(
        "secure round: {} devices ({} dropped after sharing keys), {} parameters, k = {}, t = {}\n\
         per device:  quantize + noise share {:.1} ms; protocol {:.1} ms, sent {} B, received {} B\n\
         aggregator:  {:.1} ms in all (unmasking {:.1} ms), received {} B, sent {} B\n\
         reference (plain q8 upload, same updates): device {:.1} ms and {} B; aggregator {:.1} ms\n\
         noise on {} threads: discrete Gaussian {:.0} ns/parameter, float Gaussian {:.0} ns/parameter",
        r.clients,
        r.dropped,
        r.parameters,
        r.neighbours,
        r.threshold,
        r.client_quantize_ms,
        r.client.ms,
        r.client.bytes_sent,
        r.client.bytes_received,
        r.server.ms,
        r.server_finish_ms,
        r.server.bytes_received,
        r.server.bytes_sent,
        r.plain_client_ms,
        r.plain_client_bytes,
        r.plain_server_ms,
        r.threads,
        r.discrete_gaussian_ns_per_param,
        r.float_gaussian_ns_per_param,
    ))
}

fn delta(d: usize, rng: &mut impl Rng) -> AdapterTensors {
    let mut t = AdapterTensors::default();
    t.insert(
        "w".into(),
        vec![d],
        (0..d).map(|_| rng.random_range(-1e-3f32..1e-3)).collect(),
    );
    t
}

fn measure(args: &SecaggArgs) -> anyhow::Result<SecaggReport> {
    ensure!(args.clients >= 3, "--clients must be at least 3");
    ensure!(args.parameters >= 1, "--parameters must be positive");
    ensure!(
        (0.0..0.5).contains(&args.dropout),
        "--dropout must be in [0, 0.5)"
    );
    let (n, d) = (args.clients, args.parameters);
    let min_reports = mode::expected_reports(u64::from(n), args.dropout).max(1);
    let clip = 1.0;
    let grid = mode::secagg_grid(clip, u64::from(n), args.noise_multiplier, min_reports);
    let spec = QuantizationSpec {
        clip_norm: clip,
        granularity: grid.granularity,
        noise_stddev: mode::distributed_noise_share(args.noise_multiplier, grid.units, min_reports),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let deltas: Vec<AdapterTensors> = (0..n).map(|_| delta(d, &mut rng)).collect();
    // Every (1/dropout)-th device, spread over the ring.
    let dropped: Vec<u32> = match args.dropout {
        p if p > 0.0 => {
            let every = (1.0 / p).round() as u32;
            (0..n).filter(|i| (i + 1) % every == 0).collect()
        }
        _ => Vec::new(),
    };
    let round = 1;

    // Devices: quantize with the noise share.
    let mut quantize_time = Duration::ZERO;
    let mut inputs = Vec::new();
    for t in &deltas {
        let start = Instant::now();
        inputs.push(quantize(t.clone(), &spec, &mut rng)?);
        quantize_time += start.elapsed();
    }

    let mut client_time = vec![Duration::ZERO; n as usize];
    let (mut sent, mut received) = (vec![0u64; n as usize], vec![0u64; n as usize]);
    let mut server_time = Duration::ZERO;
    let mut server: Server<u32> = Server::new(round, d);
    let mut clients = Vec::new();
    for p in 0..n {
        let start = Instant::now();
        let (client, c_pk, s_pk) = Client::new(round)?;
        client_time[p as usize] += start.elapsed();
        let advert = pb::SecAggAdvertise {
            c_pk: c_pk.to_vec(),
            s_pk: s_pk.to_vec(),
            signature: vec![0; 64],
        };
        sent[p as usize] += advert.encoded_len() as u64;
        let start = Instant::now();
        server.advertise(p, c_pk, s_pk)?;
        server_time += start.elapsed();
        clients.push(client);
    }
    let start = Instant::now();
    let assignments = server.close_advertise(args.max_neighbours)?;
    server_time += start.elapsed();
    let params = server.params().context("parameters after advertise")?;
    for (p, a) in &assignments {
        let peer = pb::SecAggPeer {
            index: 0,
            c_pk: vec![0; 32],
            s_pk: vec![0; 32],
            signature: vec![0; 64],
            device_public_key: vec![0; 32],
        };
        received[*p as usize] += (peer.encoded_len() * a.neighbours.len() + 90) as u64;
        let start = Instant::now();
        let shares = clients[*p as usize].share_keys(a)?;
        client_time[*p as usize] += start.elapsed();
        sent[*p as usize] += pb::SecAggShares::from(&shares[..]).encoded_len() as u64;
        let start = Instant::now();
        server.submit_shares(a.index, shares)?;
        server_time += start.elapsed();
    }
    let start = Instant::now();
    let routed = server.close_shares()?;
    server_time += start.elapsed();
    // Indices follow the participant keys 0..n, so index = device here.
    for (to, inbox) in routed {
        received[to as usize] += pb::SecAggShares::from(&inbox[..]).encoded_len() as u64;
        if dropped.contains(&to) {
            continue;
        }
        let start = Instant::now();
        let y = clients[to as usize].masked_input(inputs[to as usize].values(), inbox)?;
        client_time[to as usize] += start.elapsed();
        sent[to as usize] += pb::SecAggMasked {
            values: vec![0; 4 * y.len()],
            num_examples: 1,
            train_loss: 1.0,
        }
        .encoded_len() as u64;
        let start = Instant::now();
        server.submit_masked(to, y)?;
        server_time += start.elapsed();
    }
    let start = Instant::now();
    let survivors = server.close_masked()?;
    server_time += start.elapsed();
    let lists = pb::SecAggSurvivors::from(&survivors).encoded_len() as u64;
    for &i in &survivors.survivors {
        received[i as usize] += lists;
        let start = Instant::now();
        let reveals = clients[i as usize].unmask(&survivors)?;
        client_time[i as usize] += start.elapsed();
        sent[i as usize] += pb::SecAggReveals::from(&reveals[..]).encoded_len() as u64;
        let start = Instant::now();
        server.submit_reveals(i, reveals)?;
        server_time += start.elapsed();
    }
    let start = Instant::now();
    let aggregate = server.finish()?;
    let finish = start.elapsed();
    server_time += finish;
    let mut expected = vec![0u32; d];
    for &c in &aggregate.contributors {
        for (e, x) in expected.iter_mut().zip(inputs[c as usize].values()) {
            *e = e.wrapping_add(*x);
        }
    }
    ensure!(aggregate.sum == expected, "the unmasked sum is wrong");

    let live: Vec<usize> = survivors.survivors.iter().map(|&i| i as usize).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let per_live = |v: &[u64]| mean(&live.iter().map(|&i| v[i] as f64).collect::<Vec<_>>());

    // The reference: the same updates through the plain q8 path.
    let shapes = vec![("w".to_string(), vec![d])];
    let update_spec = UpdateSpec::new(shapes, 10.0);
    let mut plain_client = Duration::ZERO;
    let mut encoded = Vec::new();
    for t in &deltas {
        let start = Instant::now();
        encoded.push(codec::encode(t, Encoding::Q8, &mut rng));
        plain_client += start.elapsed();
    }
    let start = Instant::now();
    let mut sum = RunningSum::new(update_spec);
    let limits = DecodeLimits {
        max_tensors: 1,
        max_values: d,
    };
    for bytes in &encoded {
        let u = codec::decode(bytes, &limits)?;
        sum.add(&u, 1.0).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let plain_server = start.elapsed();

    // Noise samplers on all cores.
    let mut ints = vec![0i32; d];
    let start = Instant::now();
    noise::add_discrete_gaussian(&mut ints, spec.noise_stddev.max(1.0))?;
    let discrete = start.elapsed();
    let mut floats = vec![0f32; d];
    let k = mode::grid_exponent(clip, d);
    let start = Instant::now();
    noise::add_gaussian(
        &mut floats,
        mode::local_sigma(args.noise_multiplier.max(0.1), clip),
        k,
    )?;
    let float = start.elapsed();

    Ok(SecaggReport {
        clients: n,
        parameters: d,
        neighbours: params.neighbours,
        threshold: params.threshold,
        dropped: dropped.len(),
        client_quantize_ms: ms(quantize_time) / f64::from(n),
        client: Costs {
            ms: mean(&live.iter().map(|&i| ms(client_time[i])).collect::<Vec<_>>()),
            bytes_sent: per_live(&sent) as u64,
            bytes_received: per_live(&received) as u64,
        },
        server: Costs {
            ms: ms(server_time),
            bytes_sent: received.iter().sum(),
            bytes_received: sent.iter().sum(),
        },
        server_finish_ms: ms(finish),
        plain_client_ms: ms(plain_client) / f64::from(n),
        plain_client_bytes: encoded[0].len() as u64,
        plain_server_ms: ms(plain_server),
        discrete_gaussian_ns_per_param: discrete.as_secs_f64() * 1e9 / d as f64,
        float_gaussian_ns_per_param: float.as_secs_f64() * 1e9 / d as f64,
        threads: std::thread::available_parallelism().map_or(1, |t| t.get()),
    })
}
