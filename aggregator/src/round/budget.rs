//! The privacy budget: the journal's ledger composed into the accountant, and a round opened
//! only if the budget can pay for it, charged in the same journal transaction.

use fedpersona_privacy::accountant::{Accountant, AccountantError, Method};

use super::Coordinator;
use crate::auth::now_ms;
use crate::config::Config;
use crate::store::{Charge, Store};

/// Privacy spent so far against the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    pub budget: f64,
    pub rounds_charged: u64,
    /// The accountant that bounds `epsilon`.
    pub accountant: Method,
}

impl PrivacySpent {
    pub fn of(
        accountant: &Accountant,
        budget: crate::config::Budget,
    ) -> Result<Self, AccountantError> {
        Ok(PrivacySpent {
            epsilon: accountant.epsilon(budget.delta)?,
            delta: budget.delta,
            budget: budget.epsilon,
            rounds_charged: accountant.rounds(),
            accountant: accountant.method(),
        })
    }
}

/// The journal's privacy ledger, composed under `method`. The ledger keeps each round's
/// (q, z), not an ε: a restart with another accountant re-reads the whole history with that
/// one, and either is an upper bound on the same mechanism's ε.
pub fn ledger_accountant(store: &Store, method: Method) -> anyhow::Result<Accountant> {
    let mut accountant = Accountant::new(method);
    for c in store.ledger()? {
        accountant.compose(c.sampling_rate, c.noise_multiplier, 1)?;
    }
    Ok(accountant)
}

impl Coordinator {
    /// ε spent (at the budget's δ) by every round charged so far; None without DP.
    pub fn privacy_spent(&self) -> Option<PrivacySpent> {
        let budget = self.config.privacy.budget?;
        Some(PrivacySpent::of(&self.lock().accountant, budget).expect("the config validated delta"))
    }
}

/// Opens round `id` if the privacy budget can pay for it (charging it in the same journal
/// transaction); `Ok(Err(why))` when it cannot.
pub(super) fn open_round(
    config: &Config,
    store: &Store,
    accountant: &mut Accountant,
    id: u64,
    base_version: u64,
) -> anyhow::Result<Result<(), String>> {
    let p = &config.privacy;
    let Some(budget) = p.budget else {
        store.open_round(id, base_version, None, now_ms())?;
        return Ok(Ok(()));
    };
    let mut next = accountant.clone();
    next.compose(p.sampling_rate, p.noise_multiplier, 1)?;
    let after = next.epsilon(budget.delta)?;
    if after > budget.epsilon {
        let spent = accountant.epsilon(budget.delta)?;
        return Ok(Err(format!(
            "privacy budget exhausted: epsilon {spent:.4} spent of {} at delta {} ({} accountant); round {id} would bring it to {after:.4}",
            budget.epsilon,
            budget.delta,
            accountant.method()
        )));
    }
    let charge = Charge {
        noise_multiplier: p.noise_multiplier,
        sampling_rate: p.sampling_rate,
    };
    store.open_round(id, base_version, Some((p.mode.name(), charge)), now_ms())?;
    *accountant = next;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use fedpersona_privacy::accountant::Method;

    use crate::config::file::SamplingFile;
    use crate::round::testing::{device, report, start};
    use crate::round::{CheckIn, RoundPhase};

    #[test]
    fn without_dp_rounds_open_uncharged() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        assert_eq!(c.view().phase, RoundPhase::Open);
        assert!(c.store().ledger().unwrap().is_empty());
        assert_eq!(c.privacy_spent(), None);
    }

    #[test]
    fn a_round_the_budget_cannot_pay_for_does_not_open() {
        for method in Method::ALL {
            the_budget_pays_for_one_round(method);
        }
    }

    fn the_budget_pays_for_one_round(method: Method) {
        // 2 devices expected of 4: q = 0.5. The budget pays for one round, not two.
        let (z, q, delta) = (1.0, 0.5, 1e-5);
        let one = method.epsilon(z, q, 1, delta).unwrap();
        let two = method.epsilon(z, q, 2, delta).unwrap();
        let f = start(2, 1, |f| {
            f.rounds.sampling = SamplingFile::Poisson;
            f.privacy.mode = "central".into();
            f.privacy.noise_multiplier = z;
            f.privacy.population = 4;
            f.privacy.epsilon_budget = (one + two) / 2.0;
            f.privacy.delta = delta;
            f.privacy.accountant = method;
            // Two reports cannot carry a signal through this noise; the test is the budget.
            f.privacy.allow_low_snr = true;
        });
        let c = &f.coordinator;
        let spent = c.privacy_spent().unwrap();
        assert_eq!(spent.accountant, method);
        assert_eq!(spent.rounds_charged, 1);
        assert!(
            (spent.epsilon - one).abs() < 1e-9,
            "{} vs {one}",
            spent.epsilon
        );
        assert_eq!(c.store().ledger().unwrap().len(), 1);

        c.check_in(&device(1), 1);
        report(c, &device(1), 1, 1).unwrap();
        c.close_round().unwrap();
        let v = c.view();
        assert_eq!(
            (v.round, v.phase, v.rounds_committed),
            (0, RoundPhase::BudgetExhausted, 1)
        );
        match c.check_in(&device(2), 0) {
            CheckIn::BudgetSpent(why) => {
                assert!(why.starts_with("privacy budget exhausted"), "{why}")
            }
            other => panic!("not refused for the budget: {other:?}"),
        }
        assert!(!c.close_early());
        // The refused round was not charged.
        assert_eq!(c.store().ledger().unwrap().len(), 1);
        assert_eq!(c.privacy_spent().unwrap().rounds_charged, 1);
    }
}
