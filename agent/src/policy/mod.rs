//! The policy core: pure data and ONE evaluation function, no I/O.
//!
//! The proxy only asks [`evaluate`] "may this workload use this target?";
//! the configuration loader builds a [`Policy`], the daemon swaps it
//! atomically on reload.
mod selector;
mod targets;

pub use selector::{Pattern, WorkloadSelector};
pub use targets::{Protocol, Target, TargetAddress, TargetId, TargetTable};

use serde::Serialize;

use crate::workload::Workload;

/// A loaded, validated policy: names are resolved to indices, so evaluation
/// never looks anything up by string.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub targets: Vec<Target>,
    pub workloads: Vec<NamedWorkload>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
pub struct NamedWorkload {
    pub name: String,
    pub selector: WorkloadSelector,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    /// Indices into `Policy::workloads`; `None` means any workload.
    pub workloads: Option<Vec<usize>>,
    /// Indices into `Policy::targets`; `None` means any target.
    pub targets: Option<Vec<TargetId>>,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// The outcome of [`evaluate`]: a decision is not an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub action: Action,
    /// The rule that decided; `None` for the default deny.
    pub rule: Option<String>,
    pub reason: String,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

/// Decides whether `workload` may use `target`.
///
/// The order is the policy format's contract (docs/POLICY.md):
/// 1. "An explicit deny wins": the first deny rule naming this workload and
///    target decides, whatever allows exist.
/// 2. "Then allow": the first allow rule naming them decides.
/// 3. "A protected target no rule allows is denied" (fail closed).
pub fn evaluate(policy: &Policy, workload: &Workload, target: TargetId) -> Verdict {
    let target_name = &policy.targets[target.0].name;
    let applies = |rule: &&Rule| {
        rule.targets
            .as_ref()
            .is_none_or(|ids| ids.contains(&target))
            && rule.workloads.as_ref().is_none_or(|ids| {
                ids.iter()
                    .any(|&w| policy.workloads[w].selector.matches(workload))
            })
    };

    for action in [Action::Deny, Action::Allow] {
        if let Some(rule) = policy
            .rules
            .iter()
            .filter(|rule| rule.action == action)
            .find(applies)
        {
            let verb = if action == Action::Deny {
                "denies"
            } else {
                "allows"
            };
            return Verdict {
                action,
                rule: Some(rule.name.clone()),
                reason: format!(
                    "rule {:?} {verb} this workload on target {target_name:?}",
                    rule.name
                ),
            };
        }
    }
    Verdict {
        action: Action::Deny,
        rule: None,
        reason: format!("no rule allows this workload on protected target {target_name:?}"),
    }
}

/// Names of the workload definitions that match, for `policy explain`.
pub fn matching_workloads<'p>(policy: &'p Policy, workload: &Workload) -> Vec<&'p str> {
    policy
        .workloads
        .iter()
        .filter(|w| w.selector.matches(workload))
        .map(|w| w.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests;

/// What the proxy decides with: the policy, its resolved destinations and
/// whether decisions are enforced. Swapped as one value on reload, so rules
/// and targets always change together.
#[derive(Clone, Debug, Default)]
pub struct ActivePolicy {
    pub policy: Policy,
    pub table: TargetTable,
    pub enforce: bool,
}
