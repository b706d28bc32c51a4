//! How the names in a statement resolve, as the server will resolve them,
//! so that policy decides the relations and functions a statement really
//! reaches:
//!
//! - a qualified name is itself (`db.s.t` is `s.t`);
//! - an unqualified one is looked up along the session's search path, with
//!   `pg_catalog` first unless the path places it (`pg_stat_activity` is
//!   `pg_catalog.pg_stat_activity`, never `public.pg_stat_activity`).
//!
//! The agent knows what `pg_catalog` holds (relations, and each built-in
//! function's volatility: [`SystemCatalog`], read once per target) but not
//! what user schemas hold. So an unqualified name stands for every schema
//! of the path up to a `pg_catalog` hit: `orders` under `a, b` is both
//! `a.orders` and `b.orders`, and policy must allow both (a deny hits
//! either). The path is followed as the session changes it (`SET`,
//! `set_config`, `RESET`); since a change may fail or be rolled back, the
//! session keeps every path it may have ([`Names::paths`]), and a name is
//! resolved under each.
use std::collections::{HashMap, HashSet};

use super::sql::{Analysed, Effect, Name};
use crate::policy::{Builtin, Exposure, FunctionRef, StatementInfo};

/// What `pg_catalog` holds on one target.
#[derive(Debug, Default)]
pub struct SystemCatalog {
    pub relations: HashSet<String>,
    /// Built-in function names, and whether any overload is volatile.
    pub functions: HashMap<String, bool>,
}

impl SystemCatalog {
    /// The queries that read it (on the session's upstream connection).
    pub const RELATIONS_SQL: &str = "SELECT c.relname FROM pg_catalog.pg_class c \
         WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace";
    pub const FUNCTIONS_SQL: &str = "SELECT p.proname, pg_catalog.bool_or(p.provolatile = 'v') \
         FROM pg_catalog.pg_proc p \
         WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace GROUP BY p.proname";

    fn builtin(&self, name: &str) -> Builtin {
        match self.functions.get(name) {
            Some(false) => Builtin::Stable,
            Some(true) => Builtin::Volatile,
            None => Builtin::No,
        }
    }
}

/// Most search paths a session may have at once; a session that changes
/// it more often (to distinct values) gets its changes refused.
pub const MAX_PATHS: usize = 16;

/// A session's name resolution state.
#[derive(Debug)]
pub struct Names {
    catalog: std::sync::Arc<SystemCatalog>,
    /// The path the session started with (what `RESET` returns to), as
    /// the server reported it.
    default_path: Vec<String>,
    /// Every path the session may have now (the first is the default).
    paths: Vec<Vec<String>>,
    /// The role `$user` stands for.
    user: String,
}

impl Names {
    pub fn new(
        catalog: std::sync::Arc<SystemCatalog>,
        default_path: Vec<String>,
        user: String,
    ) -> Self {
        Self {
            catalog,
            paths: vec![default_path.clone()],
            default_path,
            user,
        }
    }

    /// Takes in what an allowed statement may do to the search path.
    /// Returns true when the possible paths changed (earlier resolutions
    /// are stale).
    pub fn apply(&mut self, effects: &[Effect]) -> bool {
        let mut changed = false;
        for effect in effects {
            let path = match effect {
                Effect::SearchPath(path) => path
                    .iter()
                    .map(|s| {
                        if s == "$user" {
                            self.user.clone()
                        } else {
                            s.clone()
                        }
                    })
                    .collect(),
                Effect::ResetSearchPath | Effect::ResetAll => self.default_path.clone(),
                Effect::Role | Effect::ResetRole | Effect::StatedReason(_) => continue,
            };
            if !self.paths.contains(&path) {
                self.paths.push(path);
                changed = true;
            }
        }
        changed
    }

    /// Whether `effects` would take the session past [`MAX_PATHS`].
    fn too_many_paths(&self, effects: &[Effect]) -> bool {
        let new = effects
            .iter()
            .filter(|e| matches!(e, Effect::SearchPath(p) if !self.paths.contains(p)))
            .count();
        new > 0 && self.paths.len() + new > MAX_PATHS
    }

    /// The statement as policy sees it in this session.
    pub fn resolve(&self, analysed: &Analysed) -> StatementInfo {
        let parsed = &analysed.parsed;
        let mut tables = Vec::new();
        for relation in &parsed.relations {
            self.candidates(
                relation,
                |s| self.catalog.relations.contains(s),
                |schema, name| tables.push(format!("{schema}.{name}")),
            );
        }
        tables.sort();
        tables.dedup();
        let mut functions: Vec<FunctionRef> = Vec::new();
        for function in &parsed.functions {
            self.candidates(
                function,
                |s| self.catalog.functions.contains_key(s),
                |schema, name| {
                    let builtin = if schema == "pg_catalog" {
                        self.catalog.builtin(name)
                    } else {
                        Builtin::No
                    };
                    let name = format!("{schema}.{name}");
                    if !functions.iter().any(|f| f.name == name) {
                        functions.push(FunctionRef { name, builtin });
                    }
                },
            );
        }
        let exposures = parsed
            .exposures
            .iter()
            .map(|exposure| {
                let mut tables = Vec::new();
                if let Some(relation) = &exposure.relation {
                    self.candidates(
                        relation,
                        |s| self.catalog.relations.contains(s),
                        |schema, name| tables.push(format!("{schema}.{name}")),
                    );
                }
                Exposure {
                    tables,
                    column: exposure.column.clone(),
                    how: exposure.how.describe(),
                }
            })
            .collect();
        // `DISCARD ALL` puts the login role back; the relay pins the role
        // again right after it (`Requests::repin`).
        let changes_role = parsed.effects.contains(&Effect::Role);
        let mut problem = parsed.problem.clone();
        if problem.is_none() && self.too_many_paths(&parsed.effects) {
            problem = Some(format!(
                "the session changed its search_path to more than {MAX_PATHS} values"
            ));
        }
        StatementInfo {
            kinds: parsed.kinds,
            tables,
            functions,
            parsed: problem.is_none(),
            problem,
            exposures,
            changes_role,
            text: analysed.text.clone(),
        }
    }

    /// Every `schema.name` that `name` may resolve to in this session.
    fn candidates(
        &self,
        name: &Name,
        in_catalog: impl Fn(&str) -> bool,
        mut found: impl FnMut(&str, &str),
    ) {
        if let Some(schema) = &name.schema {
            return found(schema, &name.name);
        }
        for path in &self.paths {
            let catalog_first = !path.iter().any(|s| s == "pg_catalog");
            let schemas = catalog_first
                .then_some("pg_catalog")
                .into_iter()
                .chain(path.iter().map(String::as_str));
            for schema in schemas {
                if schema == "pg_catalog" {
                    if in_catalog(&name.name) {
                        found("pg_catalog", &name.name);
                        break;
                    }
                    continue;
                }
                // A user schema may or may not hold it: a candidate, and
                // the search goes on.
                found(schema, &name.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proxy::postgres::sql::{Literals, analyze};

    fn names(path: &[&str]) -> Names {
        let catalog = SystemCatalog {
            relations: ["pg_class", "pg_stat_activity"].map(String::from).into(),
            functions: [("lower", false), ("now", false), ("random", true)]
                .map(|(n, v)| (n.to_owned(), v))
                .into(),
        };
        Names::new(
            Arc::new(catalog),
            path.iter().map(|s| s.to_string()).collect(),
            "app".into(),
        )
    }

    fn resolve(names: &Names, sql: &str) -> StatementInfo {
        names.resolve(&analyze(sql, Literals::Keep).remove(0))
    }

    #[test]
    fn catalog_names_resolve_to_pg_catalog_and_others_along_the_path() {
        let public = names(&["pg_catalog", "public"]);
        assert_eq!(
            resolve(&public, "SELECT * FROM pg_stat_activity, orders, s.x").tables,
            ["pg_catalog.pg_stat_activity", "public.orders", "s.x"]
        );
        let two = names(&["a", "b"]);
        assert_eq!(
            resolve(&two, "SELECT * FROM orders").tables,
            ["a.orders", "b.orders"]
        );
        // A path that puts a user schema before pg_catalog: that schema
        // could shadow the catalog.
        let shadow = names(&["public", "pg_catalog"]);
        assert_eq!(
            resolve(&shadow, "SELECT * FROM pg_class").tables,
            ["pg_catalog.pg_class", "public.pg_class"]
        );
        let fns = resolve(&shadow, "SELECT lower(x) FROM t").functions;
        assert_eq!(
            fns.iter()
                .map(|f| (f.name.as_str(), f.builtin))
                .collect::<Vec<_>>(),
            [
                ("public.lower", Builtin::No),
                ("pg_catalog.lower", Builtin::Stable)
            ]
        );
    }

    #[test]
    fn search_path_changes_add_possible_paths() {
        let mut names = names(&["public"]);
        let set = analyze(
            "SELECT set_config('search_path', 'private', false)",
            Literals::Keep,
        );
        assert!(names.apply(&set[0].parsed.effects));
        assert_eq!(
            resolve(&names, "SELECT * FROM secrets").tables,
            ["private.secrets", "public.secrets"]
        );
        let user = analyze("SET search_path = \"$user\"", Literals::Keep);
        assert!(names.apply(&user[0].parsed.effects));
        assert!(
            resolve(&names, "SELECT * FROM t")
                .tables
                .contains(&"app.t".to_owned())
        );
        // pg_dump's empty path: only the catalog is searched.
        let mut dump = self::names(&["public"]);
        let empty = analyze(
            "SELECT pg_catalog.set_config('search_path', '', false)",
            Literals::Keep,
        );
        dump.apply(&empty[0].parsed.effects);
        assert_eq!(
            resolve(&dump, "SELECT * FROM pg_class").tables,
            ["pg_catalog.pg_class"]
        );
    }

    #[test]
    fn role_changes_are_flagged() {
        let names = names(&["public"]);
        for sql in [
            "SET ROLE admin",
            "SET SESSION AUTHORIZATION admin",
            "SELECT set_config('role', 'admin', false)",
            "select pg_catalog.set_config('ROLE', 'admin', true)",
            "RESET ROLE",
        ] {
            assert!(resolve(&names, sql).changes_role, "{sql}");
        }
        // Resets are resets: the relay pins the role again after DISCARD ALL.
        assert!(!resolve(&names, "RESET ALL").changes_role);
        assert!(!resolve(&names, "DISCARD ALL").changes_role);
    }
}
