//! Functions are part of what a statement does: `SELECT f()` can write,
//! read another schema, or reach the server's files. Which functions a
//! statement may call without a rule naming them:
//!
//! - built-ins (`pg_catalog`) that are immutable or stable in every
//!   overload (the server's own volatility, read from `pg_proc`),
//! - except [`SIDE_EFFECTS`]: stable functions that run SQL text, and
//!   functions that touch files, the server, other sessions, locks or
//!   sequences (listed whatever their volatility, so the list reads as a
//!   whole; docs/POLICY.md shows it).
//!
//! Volatile built-ins and every other function need an allow rule whose
//! `functions` names them.
use std::sync::LazyLock;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::{Builtin, FunctionRef, Pattern};

/// Built-ins never allowed by default, as globs on the bare name.
pub const SIDE_EFFECTS: &[&str] = &[
    // Run SQL text given as an argument.
    "query_to_xml*",
    "query_to_xmlschema",
    "table_to_xml*",
    "cursor_to_xml*",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat",
    "dblink*",
    // Settings: set_config is followed as a SET (search_path) or refused
    // (role); any other spelling of it is not.
    "set_config",
    // Files and the server.
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_*",
    "pg_stat_file",
    "pg_file_*",
    "lo_*",
    "loread",
    "lowrite",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_backup_*",
    "pg_create_*",
    "pg_drop_replication_slot",
    "pg_replication_*",
    "pg_logical_*",
    "pg_copy_*_replication_slot",
    "pg_import_system_collations",
    "pg_stat_reset*",
    // Other sessions, locks, sequences, notifications.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_advisory_*",
    "pg_try_advisory_*",
    "pg_notify",
    "nextval",
    "setval",
    "pg_sleep*",
];

/// Whether `function` needs no rule naming it.
pub fn allowed_by_default(function: &FunctionRef) -> bool {
    static LISTED: LazyLock<GlobSet> = LazyLock::new(|| {
        let mut set = GlobSetBuilder::new();
        for glob in SIDE_EFFECTS {
            set.add(Glob::new(glob).expect("the shipped list is valid globs"));
        }
        set.build().expect("the shipped list is valid globs")
    });
    let bare = function.name.rsplit('.').next().unwrap_or(&function.name);
    function.builtin == Builtin::Stable && !LISTED.is_match(bare)
}

/// Whether an allow rule's `functions` lets `function` through.
pub fn covered(patterns: &[Pattern], function: &FunctionRef) -> bool {
    allowed_by_default(function) || patterns.iter().any(|p| p.matches(&function.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, builtin: Builtin) -> FunctionRef {
        FunctionRef {
            name: name.into(),
            builtin,
        }
    }

    #[test]
    fn stable_builtins_pass_and_the_listed_ones_do_not() {
        assert!(allowed_by_default(&f("pg_catalog.lower", Builtin::Stable)));
        assert!(allowed_by_default(&f("pg_catalog.now", Builtin::Stable)));
        for name in [
            "pg_catalog.query_to_xml",
            "pg_catalog.query_to_xml_and_xmlschema",
            "pg_catalog.set_config",
            "pg_catalog.pg_ls_dir",
            "pg_catalog.lo_import",
            "pg_catalog.pg_try_advisory_lock",
            "pg_catalog.pg_copy_logical_replication_slot",
            "pg_catalog.nextval",
        ] {
            assert!(!allowed_by_default(&f(name, Builtin::Stable)), "{name}");
        }
        assert!(!allowed_by_default(&f(
            "pg_catalog.random",
            Builtin::Volatile
        )));
        assert!(!allowed_by_default(&f("public.lower", Builtin::No)));
    }
}
