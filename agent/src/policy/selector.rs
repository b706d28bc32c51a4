//! Workload selectors: which processes a `[[workload]]` definition names.
use globset::{Glob, GlobBuilder, GlobMatcher};

use crate::workload::Workload;

/// A glob (`*`, `?`, `[..]`) over one identity field; `*` does not cross `/`.
#[derive(Clone, Debug)]
pub struct Pattern {
    matcher: GlobMatcher,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Self, globset::Error> {
        let glob: Glob = GlobBuilder::new(text).literal_separator(true).build()?;
        Ok(Self {
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        self.matcher.is_match(value)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        self.matcher.glob().glob()
    }
}

/// Every field that is set must match (AND); within a field, any of its
/// values may match (OR). A selector with no field set matches nothing —
/// the loader refuses to build one.
#[derive(Clone, Debug, Default)]
pub struct WorkloadSelector {
    pub unit: Vec<Pattern>,
    pub uid: Vec<u32>,
    pub user: Vec<Pattern>,
    pub group: Vec<Pattern>,
    pub exe: Vec<Pattern>,
    /// Lower-case hex digests, compared exactly.
    pub exe_sha256: Vec<String>,
    /// cgroup path prefixes, matched on whole path components.
    pub cgroup: Vec<String>,
    pub container: Vec<Pattern>,
    pub comm: Vec<Pattern>,
    /// The CI job's project, ref (branch or tag) and job id.
    pub ci_project: Vec<Pattern>,
    pub ci_ref: Vec<Pattern>,
    pub ci_job: Vec<Pattern>,
}

impl WorkloadSelector {
    pub fn is_empty(&self) -> bool {
        self.unit.is_empty()
            && self.uid.is_empty()
            && self.user.is_empty()
            && self.group.is_empty()
            && self.exe.is_empty()
            && self.exe_sha256.is_empty()
            && self.cgroup.is_empty()
            && self.container.is_empty()
            && self.comm.is_empty()
            && self.ci_project.is_empty()
            && self.ci_ref.is_empty()
            && self.ci_job.is_empty()
    }

    pub fn matches(&self, w: &Workload) -> bool {
        !self.is_empty()
            && field(&self.unit, w.unit.as_deref())
            && (self.uid.is_empty() || self.uid.contains(&w.uid))
            && field(&self.user, w.user.as_deref())
            && (self.group.is_empty()
                || w.groups
                    .iter()
                    .any(|g| self.group.iter().any(|p| p.matches(g))))
            && field(&self.exe, w.exe.as_deref())
            && (self.exe_sha256.is_empty()
                || w.exe_sha256
                    .as_ref()
                    .is_some_and(|d| self.exe_sha256.contains(d)))
            && (self.cgroup.is_empty()
                || w.cgroup.as_deref().is_some_and(|path| {
                    self.cgroup
                        .iter()
                        .any(|prefix| cgroup_has_prefix(path, prefix))
                }))
            && field(&self.container, w.container.as_deref())
            && field(&self.comm, Some(&w.comm))
            && field(&self.ci_project, job(w, |j| j.project.as_deref()))
            && field(&self.ci_ref, job(w, |j| j.git_ref.as_deref()))
            && field(&self.ci_job, job(w, |j| j.job.as_deref()))
    }
}

/// A field of the caller's CI job, if it runs in one.
fn job<'w>(
    w: &'w Workload,
    field: impl Fn(&'w crate::workload::JobContext) -> Option<&'w str>,
) -> Option<&'w str> {
    w.job.as_ref().and_then(field)
}

/// An unset selector field matches; a set one needs a value that matches.
fn field(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

/// `/a/b` is a prefix of `/a/b` and `/a/b/c`, not of `/a/bc`.
fn cgroup_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_prefix_is_component_wise() {
        assert!(cgroup_has_prefix("/ci.slice/job.service", "/ci.slice"));
        assert!(cgroup_has_prefix("/ci.slice", "/ci.slice/"));
        assert!(!cgroup_has_prefix("/ci.slicer/job.service", "/ci.slice"));
        assert!(cgroup_has_prefix("/anything", "/"));
    }

    #[test]
    fn star_does_not_cross_slash() {
        let p = Pattern::new("/usr/bin/*").unwrap();
        assert!(p.matches("/usr/bin/curl"));
        assert!(!p.matches("/usr/bin/x/curl"));
    }
}
