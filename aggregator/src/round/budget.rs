//! The privacy budget: the journal's ledger composed into the accountant, and a round opened
//! only if the budget can pay for it, charged in the same journal transaction.

use fedpersona_privacy::accountant::Accountant;

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
}

impl PrivacySpent {
    pub fn of(
        accountant: &Accountant,
        budget: crate::config::Budget,
    ) -> Result<Self, fedpersona_privacy::accountant::AccountantError> {
        Ok(PrivacySpent {
            epsilon: accountant.epsilon(budget.delta)?.0,
            delta: budget.delta,
            budget: budget.epsilon,
            rounds_charged: accountant.rounds(),
        })
    }
}

/// The journal's privacy ledger, composed.
pub fn ledger_accountant(store: &Store) -> anyhow::Result<Accountant> {
    let mut accountant = Accountant::default();
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
    let (after, _) = next.epsilon(budget.delta)?;
    if after > budget.epsilon {
        let (spent, _) = accountant.epsilon(budget.delta)?;
        return Ok(Err(format!(
            "privacy budget exhausted: epsilon {spent:.4} spent of {} at delta {}; round {id} would bring it to {after:.4}",
            budget.epsilon, budget.delta
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
