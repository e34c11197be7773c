//! Prometheus metrics of the aggregator (rounds, reports, rejects by reason, bytes, round
//! durations, the last release's norms and signal-to-noise ratio) and the `/metrics` HTTP
//! endpoint.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// What a check-in can be answered: a task, come back later, or draw yourself in.
pub const CHECKIN_ANSWERS: [&str; 3] = ["task", "later", "sample"];

/// The aggregator's metrics, in a registry of their own (several aggregators may share a
/// process in tests and simulations).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    rounds: IntCounterVec,
    reports: IntCounter,
    rejects: IntCounterVec,
    upload_bytes: IntCounter,
    download_bytes: IntCounter,
    round_seconds: Histogram,
    checkins: IntCounterVec,
    enrollments: IntCounter,
    current_round: IntGauge,
    model_version: IntGauge,
    epsilon_spent: Gauge,
    update_norm: Gauge,
    noise_norm_expected: Gauge,
    snr: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("fedpersona".into()), None).expect("valid registry prefix");
        let rounds = IntCounterVec::new(
            Opts::new("rounds_total", "Rounds closed, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let reports = IntCounter::new("reports_total", "Updates accepted into a round")
            .expect("valid metric");
        let rejects = IntCounterVec::new(
            Opts::new("rejects_total", "Requests refused, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let upload_bytes = IntCounter::new("upload_bytes_total", "Bytes of accepted updates")
            .expect("valid metric");
        let download_bytes = IntCounter::new("download_bytes_total", "Bytes of adapters sent")
            .expect("valid metric");
        let round_seconds = Histogram::with_opts(
            HistogramOpts::new("round_duration_seconds", "From opening to closing a round")
                .buckets(prometheus::exponential_buckets(0.5, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let checkins = IntCounterVec::new(
            Opts::new("checkins_total", "Check-ins, by answer"),
            &["answer"],
        )
        .expect("valid metric");
        let enrollments =
            IntCounter::new("enrollments_total", "Successful enrollments").expect("valid metric");
        let current_round =
            IntGauge::new("current_round", "Id of the round being run").expect("valid metric");
        let model_version = IntGauge::new("model_version", "Published global adapter version")
            .expect("valid metric");
        let epsilon_spent = Gauge::new(
            "privacy_epsilon_spent",
            "User-level epsilon charged to the privacy ledger (at the budget's delta)",
        )
        .expect("valid metric");
        let update_norm = Gauge::new(
            "round_update_norm",
            "L2 norm of the last committed round's released (noised) mean update",
        )
        .expect("valid metric");
        let noise_norm_expected = Gauge::new(
            "round_noise_norm_expected",
            "Expected L2 norm of the DP noise on the last committed round's mean (0 without DP)",
        )
        .expect("valid metric");
        let snr = Gauge::new(
            "round_snr",
            "Estimated signal-to-noise ratio of the last committed round's mean: \
             sqrt(max(0, update_norm^2 - noise_norm_expected^2)) / noise_norm_expected \
             (+Inf without DP)",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the running aggregator's version"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every label of the fixed sets exists from the start, so a rate over them is defined
        // before the first event.
        for outcome in ["committed", "abandoned"] {
            rounds.with_label_values(&[outcome]);
        }
        for answer in CHECKIN_ANSWERS {
            checkins.with_label_values(&[answer]);
        }
        for c in [
            Box::new(rounds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reports.clone()),
            Box::new(rejects.clone()),
            Box::new(upload_bytes.clone()),
            Box::new(download_bytes.clone()),
            Box::new(round_seconds.clone()),
            Box::new(checkins.clone()),
            Box::new(enrollments.clone()),
            Box::new(current_round.clone()),
            Box::new(model_version.clone()),
            Box::new(epsilon_spent.clone()),
            Box::new(update_norm.clone()),
            Box::new(noise_norm_expected.clone()),
            Box::new(snr.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            rounds,
            reports,
            rejects,
            upload_bytes,
            download_bytes,
            round_seconds,
            checkins,
            enrollments,
            current_round,
            model_version,
            epsilon_spent,
            update_norm,
            noise_norm_expected,
            snr,
        }
    }

    /// The norms of a committed round's release.
    pub fn round_released(&self, norms: &fedpersona_privacy::snr::Measured) {
        self.update_norm.set(norms.update_norm);
        self.noise_norm_expected.set(norms.noise_norm_expected);
        self.snr.set(norms.snr);
    }

    pub fn set_epsilon_spent(&self, epsilon: f64) {
        self.epsilon_spent.set(epsilon);
    }

    pub fn report(&self, bytes: usize) {
        self.reports.inc();
        self.upload_bytes.inc_by(bytes as u64);
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejects.with_label_values(&[reason]).inc();
    }

    pub fn rejects(&self, reason: &str) -> u64 {
        self.rejects.with_label_values(&[reason]).get()
    }

    /// Requests refused for any reason.
    pub fn rejects_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.rejects
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    pub fn reports(&self) -> u64 {
        self.reports.get()
    }

    pub fn download(&self, bytes: usize) {
        self.download_bytes.inc_by(bytes as u64);
    }

    /// Counts a check-in's answer, one of [`CHECKIN_ANSWERS`].
    pub fn checkin(&self, answer: &'static str) {
        debug_assert!(CHECKIN_ANSWERS.contains(&answer), "{answer}");
        self.checkins.with_label_values(&[answer]).inc();
    }

    pub fn enrolled(&self) {
        self.enrollments.inc();
    }

    pub fn round_closed(&self, committed: bool, took: Duration) {
        let outcome = if committed { "committed" } else { "abandoned" };
        self.rounds.with_label_values(&[outcome]).inc();
        self.round_seconds.observe(took.as_secs_f64());
    }

    pub fn set_round(&self, round: u64, version: u64) {
        self.current_round.set(round as i64);
        self.model_version.set(version as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to memory");
        String::from_utf8(out).expect("exposition is UTF-8")
    }

    /// Serves `GET /metrics` on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_labels_and_the_build_exist_before_any_event() {
        let text = Metrics::new().render();
        for line in [
            "fedpersona_rounds_total{outcome=\"committed\"} 0",
            "fedpersona_rounds_total{outcome=\"abandoned\"} 0",
            "fedpersona_checkins_total{answer=\"task\"} 0",
            "fedpersona_checkins_total{answer=\"later\"} 0",
            "fedpersona_checkins_total{answer=\"sample\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let build = format!(
            "fedpersona_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
    }
}
