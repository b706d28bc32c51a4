//! A walk over one statement of PostgreSQL's own parse tree: its kinds,
//! every relation and function it names (as written), and what it does to
//! the session's name resolution (search_path, role).
//!
//! The tree is libpg_query's, seen through its serde form (`lean.rs`): one generic walk
//! reaches every node of every statement type, where a typed visitor would
//! need a case per node type and silently miss the ones it forgot. Nothing
//! here indexes or unwraps: a tree of an unexpected shape yields less, and
//! what it yields is checked by policy (an unknown statement type is
//! `other`).
use super::lean::Lean;
use pg_query::protobuf::{DiscardMode, GrantTargetType, ObjectType, VariableSetKind};

/// A node's fields.
type Fields = [(&'static str, Lean)];

fn get<'a>(fields: &'a Fields, key: &str) -> Option<&'a Lean> {
    fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

use crate::policy::{KindSet, StatementKind as K};

/// A relation or function name as the statement wrote it (identifiers
/// already folded as PostgreSQL folds them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name {
    pub schema: Option<String>,
    pub name: String,
}

/// What a statement does to how later names resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// `SET search_path`, `set_config('search_path', …)`: the new path,
    /// as written (`$user` kept).
    SearchPath(Vec<String>),
    /// `RESET search_path`, `SET search_path TO DEFAULT`.
    ResetSearchPath,
    /// `RESET ALL`, `DISCARD ALL`: every setting back to its default
    /// (`DISCARD ALL` also puts the session authorization back).
    ResetAll,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, `set_config('role', …)`.
    Role,
    /// `DISCARD ALL`: the session's authorization back to the login role.
    ResetRole,
    /// `SET application_name = 'reason: …'`: why, as the client states
    /// it for what it asks next.
    StatedReason(String),
}

/// One statement, as parsed: independent of any session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub kinds: KindSet,
    /// Relations it names (tables, views, sequences, indexes), CTE
    /// references excluded; `GRANT … ON ALL TABLES IN SCHEMA s` names `s.*`.
    pub relations: Vec<Name>,
    /// Functions it calls (including aggregates and table functions).
    pub functions: Vec<Name>,
    pub effects: Vec<Effect>,
    /// Why it cannot be checked: it did not parse, or parsed but cannot
    /// be followed.
    pub problem: Option<String>,
    /// It did not parse at all.
    pub unparsed: bool,
    /// It was over the size limit, so it was not parsed.
    pub too_large: bool,
    /// Its literals may be secrets (`CREATE ROLE … PASSWORD '…'`).
    pub holds_password: bool,
    /// Uses of columns whose values would leave without a table origin,
    /// so a table-column mask could not apply (see `Use`).
    pub exposures: Vec<Exposure>,
    /// Its meaning depends on literal values (`set_config('role', …)`,
    /// `SET search_path = …`): it must not share a decision with a
    /// statement that differs only in literals.
    pub literal_sensitive: bool,
}

/// A column use a table-column mask cannot follow: the value leaves in an
/// expression, a set operation, a subquery's output, a write, RETURNING
/// or a whole row, where the server reports no table origin for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// The relation, where the statement says (an alias resolved); None:
    /// any relation the statement names.
    pub relation: Option<Name>,
    /// None: every column (a whole row, a `*`).
    pub column: Option<String>,
    pub how: Use,
}

/// How the values a walk reaches are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Use {
    /// The top-level SELECT's own output: a plain column keeps its table
    /// origin (masked there).
    #[default]
    Output,
    /// WHERE, JOIN ON, GROUP BY, ORDER BY, …: the value does not leave.
    Filter,
    Expression,
    SetOperation,
    /// A subquery's or CTE's output, used by the query around it.
    Nested,
    /// Written into a table (INSERT … SELECT, UPDATE … SET, SELECT INTO,
    /// CREATE TABLE AS, a view).
    Write,
    Returning,
    WholeRow,
}

impl Use {
    pub fn describe(self) -> &'static str {
        match self {
            Use::Output | Use::Filter | Use::Expression => "in an expression",
            Use::SetOperation => "in a set operation (UNION, INTERSECT, EXCEPT)",
            Use::Nested => "through a subquery or CTE",
            Use::Write => "copied into a table",
            Use::Returning => "in RETURNING",
            Use::WholeRow => "in a whole-row reference",
        }
    }

    /// What a use inside this one becomes: only the top level keeps plain
    /// output columns plain.
    fn inner(self, as_: Use) -> Use {
        if self == Use::Output { as_ } else { self }
    }
}

/// A column reference as written, with how it is used.
struct ColumnUse {
    /// The qualifier (`c` of `c.email`, `s.t` of `s.t.email`).
    qualifier: Vec<String>,
    /// None for `*`.
    column: Option<String>,
    how: Use,
}

/// Walks one statement (the `stmt` of a RawStmt, in serde form).
pub fn walk(statement: &Lean) -> Parsed {
    let mut parsed = walk_as(statement, Use::Output, 0);
    if parsed.kinds == KindSet::default() {
        parsed.kinds.insert(K::Other);
    }
    parsed
}

/// DO blocks nest at most this deep (a DO inside a DO's body).
const MAX_DO_DEPTH: u32 = 2;

fn walk_as(statement: &Lean, use_: Use, depth: u32) -> Parsed {
    let mut walker = Walker {
        use_,
        depth,
        ..Walker::default()
    };
    walker.value(statement, false);
    walker.resolve_exposures();
    let mut parsed = walker.parsed;
    parsed
        .relations
        .sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    parsed.relations.dedup();
    parsed
        .functions
        .sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    parsed.functions.dedup();
    parsed
}

#[derive(Default)]
struct Walker {
    parsed: Parsed,
    /// CTE names visible where the walk is.
    ctes: Vec<String>,
    /// How what the walk reaches now is used.
    use_: Use,
    columns: Vec<ColumnUse>,
    /// Relation aliases of the statement (any scope).
    aliases: Vec<(String, Name)>,
    /// The setting a `SELECT … FROM pg_settings WHERE name = '…'` reads.
    settings_row: Option<String>,
    /// How many DO bodies this walk is inside.
    depth: u32,
}

/// Statements whose `relation` is the row target (never a CTE reference).
const DML: [&str; 4] = ["InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"];

impl Walker {
    /// `target`: a RangeVar reached here is a statement's target relation,
    /// which a CTE name never stands for.
    fn value(&mut self, value: &Lean, target: bool) {
        match value {
            Lean::Map(map) => self.object(map, target),
            Lean::Seq(items) => items.iter().for_each(|v| self.value(v, target)),
            _ => {}
        }
    }

    fn object(&mut self, map: &Fields, target: bool) {
        // Typed fields (`InsertStmt.relation`, `CallStmt.funccall`) are not
        // wrapped in a node: RangeVars and FuncCalls are known by shape.
        if get(map, "relname").is_some() && get(map, "relpersistence").is_some() {
            self.range_var(map, target);
            return;
        }
        if get(map, "funcname").is_some() && get(map, "funcformat").is_some() {
            self.func_call(map);
        }
        for (key, child) in map {
            match child {
                Lean::Map(fields) if is_node_type(key) => self.node(key, fields),
                _ => self.value(child, false),
            }
        }
    }

    /// A node of a known type: its kind, then its children.
    fn node(&mut self, node: &str, fields: &Fields) {
        let flag = |name: &str| get(fields, name).and_then(Lean::as_bool).unwrap_or(false);
        let int = |name: &str| get(fields, name).and_then(Lean::as_i64).unwrap_or(0) as i32;
        let text = |name: &str| get(fields, name).and_then(Lean::as_str).unwrap_or("");
        let kinds = &mut self.parsed.kinds;
        match node {
            "RangeVar" => return self.range_var(fields, false),
            "ColumnRef" => return self.column_ref(fields),
            "FuncCall" => self.func_call(fields),
            "SelectStmt" => self.select_stmt(fields),
            "InsertStmt" => kinds.insert(K::Insert),
            "UpdateStmt" => kinds.insert(K::Update),
            "DeleteStmt" => kinds.insert(K::Delete),
            "MergeStmt" => kinds.insert(K::Merge),
            "CopyStmt" => kinds.insert(if flag("is_program") || !text("filename").is_empty() {
                // A server-side file is the server's file system: as
                // powerful as a program.
                K::CopyProgram
            } else if flag("is_from") {
                K::CopyFrom
            } else {
                K::CopyTo
            }),
            "TruncateStmt" => kinds.insert(K::Truncate),
            "GrantStmt" | "GrantRoleStmt" => self.grant(node, fields),
            "VariableSetStmt" => self.variable_set(fields),
            "VariableShowStmt" => kinds.insert(K::Show),
            "TransactionStmt" => kinds.insert(K::Transaction),
            "CallStmt" => kinds.insert(K::Call),
            "DoStmt" => {
                kinds.insert(K::Do);
                self.do_block(fields);
            }
            "ExecuteStmt" => kinds.insert(K::Execute),
            "PrepareStmt" | "DeallocateStmt" => kinds.insert(K::Prepare),
            "ExplainStmt" => kinds.insert(K::Explain),
            "ListenStmt" => kinds.insert(K::Listen),
            // `UNLISTEN *` (no channel) is a pool's reset.
            "UnlistenStmt" if text("conditionname").is_empty() => kinds.insert(K::Reset),
            "UnlistenStmt" => kinds.insert(K::Listen),
            "NotifyStmt" => kinds.insert(K::Notify),
            "VacuumStmt" => kinds.insert(if flag("is_vacuumcmd") {
                K::Vacuum
            } else {
                K::Analyze
            }),
            "DeclareCursorStmt" | "FetchStmt" => kinds.insert(K::Select),
            // `CLOSE ALL`.
            "ClosePortalStmt" if text("portalname").is_empty() => kinds.insert(K::Reset),
            "ClosePortalStmt" => kinds.insert(K::Select),
            "LockStmt" => kinds.insert(K::Lock),
            "DiscardStmt" => {
                kinds.insert(K::Reset);
                if int("target") == DiscardMode::DiscardAll as i32 {
                    self.parsed.effects.push(Effect::ResetAll);
                    self.parsed.effects.push(Effect::ResetRole);
                }
            }
            "ConstraintsSetStmt" => kinds.insert(K::Set),
            // A PL/pgSQL assignment (`n := …`) in a DO body: its value is
            // evaluated as a SELECT, walked below.
            "PlassignStmt" => {}
            "DropStmt" => self.drop_stmt(fields),
            "CommentStmt" | "SecLabelStmt" => self.comment(fields),
            "AlterSystemStmt"
            | "CheckPointStmt"
            | "LoadStmt"
            | "ReindexStmt"
            | "ClusterStmt"
            | "RefreshMatViewStmt"
            | "ImportForeignSchemaStmt" => kinds.insert(K::Other),
            "CreateRoleStmt"
            | "AlterRoleStmt"
            | "AlterRoleSetStmt"
            | "CreateUserMappingStmt"
            | "AlterUserMappingStmt" => {
                self.parsed.holds_password = true;
                kinds.insert(if node.starts_with("Create") {
                    K::Create
                } else {
                    K::Alter
                });
            }
            other => {
                if let Some(kind) = kind_by_name(other) {
                    kinds.insert(kind);
                }
            }
        }
        self.children(node, fields);
    }

    /// SELECT (a bare VALUES list reads nothing); SELECT INTO creates.
    fn select_stmt(&mut self, fields: &Fields) {
        let kinds = &mut self.parsed.kinds;
        self.settings_row = settings_row(fields);
        // A bare VALUES list (`INSERT … VALUES`) reads nothing.
        let values_only = get(fields, "values_lists")
            .and_then(Lean::as_array)
            .is_some_and(|v| !v.is_empty());
        if !values_only {
            kinds.insert(K::Select);
        }
        if get(fields, "into_clause").is_some() {
            kinds.insert(K::Create);
            self.use_ = Use::Write;
        }
    }

    /// GRANT and REVOKE, of privileges or roles; `ON ALL TABLES IN SCHEMA`
    /// is about every relation of those schemas.
    fn grant(&mut self, node: &str, fields: &Fields) {
        let flag = |name: &str| get(fields, name).and_then(Lean::as_bool).unwrap_or(false);
        let int = |name: &str| get(fields, name).and_then(Lean::as_i64).unwrap_or(0) as i32;
        let kinds = &mut self.parsed.kinds;
        kinds.insert(if flag("is_grant") {
            K::Grant
        } else {
            K::Revoke
        });
        if node == "GrantStmt" && int("targtype") == GrantTargetType::AclTargetAllInSchema as i32 {
            for schema in strings(get(fields, "objects")) {
                self.parsed.relations.push(Name {
                    schema: Some(schema),
                    name: "*".into(),
                });
            }
        }
    }

    /// DROP, with the relations it names.
    fn drop_stmt(&mut self, fields: &Fields) {
        let int = |name: &str| get(fields, name).and_then(Lean::as_i64).unwrap_or(0) as i32;
        let kinds = &mut self.parsed.kinds;
        kinds.insert(K::Drop);
        if is_relation_type(int("remove_type")) {
            for object in get(fields, "objects")
                .and_then(Lean::as_array)
                .into_iter()
                .flatten()
            {
                self.name_list(object, false);
            }
        }
    }

    /// COMMENT ON and SECURITY LABEL: they alter what they name.
    fn comment(&mut self, fields: &Fields) {
        let int = |name: &str| get(fields, name).and_then(Lean::as_i64).unwrap_or(0) as i32;
        let kinds = &mut self.parsed.kinds;
        kinds.insert(K::Alter);
        let objtype = int("objtype");
        if let Some(object) = get(fields, "object") {
            if is_relation_type(objtype) {
                self.name_list(object, false);
            } else if objtype == ObjectType::ObjectColumn as i32 {
                self.name_list(object, true);
            }
        }
    }

    /// The children of a node, with the CTE names of its WITH clause in
    /// scope where PostgreSQL has them: a non-recursive CTE sees the ones
    /// before it, a recursive WITH sees all; the statement body sees all;
    /// a DML statement's target relation sees none.
    fn children(&mut self, node: &str, fields: &Fields) {
        let outer = self.ctes.len();
        if let Some(with) = get(fields, "with_clause") {
            let recursive = with.get("recursive").and_then(Lean::as_bool) == Some(true);
            let ctes: Vec<(&str, Option<&Lean>)> = with
                .get("ctes")
                .and_then(Lean::as_array)
                .into_iter()
                .flatten()
                .filter_map(|cte| {
                    let cte = cte.get("node")?.get("CommonTableExpr")?;
                    Some((cte.get("ctename")?.as_str()?, cte.get("ctequery")))
                })
                .collect();
            if recursive {
                self.ctes
                    .extend(ctes.iter().map(|(name, _)| name.to_string()));
            }
            let around = self.use_;
            for (name, query) in ctes {
                if let Some(query) = query {
                    self.use_ = around.inner(Use::Nested);
                    self.value(query, false);
                    self.use_ = around;
                }
                if !recursive {
                    self.ctes.push(name.to_owned());
                }
            }
        }
        let dml = DML.contains(&node);
        let around = self.use_;
        for (key, child) in fields {
            if *key == "with_clause" {
                continue;
            }
            self.use_ = field_use(node, key, around);
            if node == "SelectStmt" && *key == "target_list" {
                // A plain column of the output keeps its table origin; any
                // other output is an expression.
                for item in child.as_array().unwrap_or_default() {
                    let plain = item
                        .get("node")
                        .and_then(|n| n.get("ResTarget"))
                        .and_then(|t| t.get("val"))
                        .and_then(|v| v.get("node"))
                        .is_some_and(|v| v.get("ColumnRef").is_some());
                    self.use_ = if plain {
                        around
                    } else {
                        around.inner(Use::Expression)
                    };
                    self.value(item, false);
                }
                continue;
            }
            self.value(child, dml && *key == "relation");
        }
        self.use_ = around;
        self.ctes.truncate(outer);
    }

    fn column_ref(&mut self, fields: &Fields) {
        if self.use_ == Use::Filter {
            return;
        }
        let mut qualifier = Vec::new();
        let mut column = None;
        for part in get(fields, "fields")
            .and_then(Lean::as_array)
            .unwrap_or_default()
        {
            let part = part.get("node").unwrap_or(part);
            match part.get("String") {
                Some(string) => {
                    let name = string.get("sval").and_then(Lean::as_str).unwrap_or("");
                    if let Some(previous) = column.replace(name.to_owned()) {
                        qualifier.push(previous);
                    }
                }
                // `*`: every column of what the qualifier names.
                None => {
                    if let Some(previous) = column.take() {
                        qualifier.push(previous);
                    }
                }
            }
        }
        self.columns.push(ColumnUse {
            qualifier,
            column,
            how: self.use_,
        });
    }

    /// Column uses → exposures, now that every alias is known.
    fn resolve_exposures(&mut self) {
        let relations = |qualifier: &[String], aliases: &[(String, Name)]| -> Vec<Option<Name>> {
            match qualifier {
                [] => vec![None],
                [single] => {
                    let aliased: Vec<Option<Name>> = aliases
                        .iter()
                        .filter(|(alias, _)| alias == single)
                        .map(|(_, name)| Some(name.clone()))
                        .collect();
                    if aliased.is_empty() {
                        vec![Some(Name {
                            schema: None,
                            name: single.clone(),
                        })]
                    } else {
                        aliased
                    }
                }
                [.., schema, table] => vec![Some(Name {
                    schema: Some(schema.clone()),
                    name: table.clone(),
                })],
            }
        };
        let mut exposures = Vec::new();
        for use_ in std::mem::take(&mut self.columns) {
            // A bare name may be a whole row (`SELECT c FROM customers c`).
            if use_.qualifier.is_empty()
                && let Some(name) = &use_.column
                && self.aliases.iter().any(|(alias, _)| alias == name)
            {
                for relation in relations(std::slice::from_ref(name), &self.aliases) {
                    exposures.push(Exposure {
                        relation,
                        column: None,
                        how: Use::WholeRow,
                    });
                }
            }
            if use_.how == Use::Output {
                continue;
            }
            for relation in relations(&use_.qualifier, &self.aliases) {
                exposures.push(Exposure {
                    relation,
                    column: use_.column.clone(),
                    how: use_.how,
                });
            }
        }
        exposures.dedup();
        self.parsed.exposures.extend(exposures);
    }

    fn range_var(&mut self, map: &Fields, target: bool) {
        let field = |name: &str| get(map, name).and_then(Lean::as_str).unwrap_or("");
        let (schema, name) = (field("schemaname"), field("relname"));
        if name.is_empty() {
            return;
        }
        if schema.is_empty() && !target && self.ctes.iter().any(|cte| cte == name) {
            return;
        }
        let relation = Name {
            schema: (!schema.is_empty()).then(|| schema.to_owned()),
            name: name.to_owned(),
        };
        let alias = get(map, "alias")
            .and_then(|a| a.get("aliasname"))
            .and_then(Lean::as_str)
            .unwrap_or(name);
        self.aliases.push((alias.to_owned(), relation.clone()));
        self.parsed.relations.push(relation);
    }

    fn func_call(&mut self, map: &Fields) {
        let mut parts = strings(get(map, "funcname"));
        let Some(name) = parts.pop() else {
            return;
        };
        let schema = parts.pop();
        let builtin = schema.as_deref().is_none_or(|s| s == "pg_catalog");
        if builtin && name == "set_config" {
            self.set_config(get(map, "args"));
            return;
        }
        if builtin && name == "pg_advisory_unlock_all" {
            // What connection pools send to give a connection back clean.
            self.parsed.kinds.insert(K::Reset);
            return;
        }
        self.parsed.functions.push(Name { schema, name });
    }

    /// A DO block: what its body does is what the statement does. What
    /// it selects can reach the client only through messages (RAISE), so
    /// every column it uses counts as used in an expression.
    fn do_block(&mut self, fields: &Fields) {
        self.parsed.literal_sensitive = true;
        let mut body = None;
        let mut language = "plpgsql".to_owned();
        for item in get(fields, "args")
            .and_then(Lean::as_array)
            .unwrap_or_default()
        {
            let Some(option) = item.get("node").unwrap_or(item).get("DefElem") else {
                continue;
            };
            let value = option
                .get("arg")
                .and_then(|a| a.get("node").unwrap_or(a).get("String"))
                .map(|s| {
                    s.get("sval")
                        .and_then(Lean::as_str)
                        .unwrap_or("")
                        .to_owned()
                });
            match option.get("defname").and_then(Lean::as_str) {
                Some("as") => body = value,
                Some("language") => language = value.unwrap_or_default().to_ascii_lowercase(),
                _ => {}
            }
        }
        if language != "plpgsql" {
            return self.problem("a DO block in a language other than plpgsql cannot be analysed");
        }
        if self.depth >= MAX_DO_DEPTH {
            return self.problem("DO blocks nested this deep cannot be analysed");
        }
        let pieces = match super::plpgsql::sql_of(&body.unwrap_or_default()) {
            Ok(pieces) => pieces,
            Err(why) => return self.problem(&format!("the DO block cannot be checked: {why}")),
        };
        for (sql, mode) in pieces {
            let tree = match pg_query::parse(&sql, mode) {
                Ok(tree) => tree,
                Err(error) => {
                    return self.problem(&format!("the DO block cannot be checked: {error}"));
                }
            };
            for raw in &tree.protobuf.stmts {
                let Some(stmt) = &raw.stmt else { continue };
                let inner = walk_as(&Lean::of(stmt), Use::Expression, self.depth + 1);
                self.merge(inner);
            }
        }
    }

    fn merge(&mut self, inner: Parsed) {
        let parsed = &mut self.parsed;
        for kind in inner.kinds.iter() {
            parsed.kinds.insert(kind);
        }
        parsed.relations.extend(inner.relations);
        parsed.functions.extend(inner.functions);
        parsed.effects.extend(inner.effects);
        parsed.exposures.extend(inner.exposures);
        parsed.holds_password |= inner.holds_password;
        if let Some(problem) = inner.problem {
            self.problem(&problem);
        }
    }

    /// `SET name …`, `RESET …`.
    fn variable_set(&mut self, fields: &Fields) {
        self.parsed.literal_sensitive = true;
        let kind = get(fields, "kind").and_then(Lean::as_i64).unwrap_or(0) as i32;
        let name = get(fields, "name")
            .and_then(Lean::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        if kind == VariableSetKind::VarResetAll as i32 {
            self.parsed.kinds.insert(K::Reset);
            self.parsed.effects.push(Effect::ResetAll);
            return;
        }
        let reset = kind == VariableSetKind::VarReset as i32
            || kind == VariableSetKind::VarSetDefault as i32;
        match name.as_str() {
            "role" | "session_authorization" => {
                self.parsed.kinds.insert(K::Other);
                self.parsed.effects.push(Effect::Role);
            }
            "search_path" if reset => {
                self.parsed.kinds.insert(K::Set);
                self.parsed.effects.push(Effect::ResetSearchPath);
            }
            "search_path" if kind == VariableSetKind::VarSetValue as i32 => {
                self.parsed.kinds.insert(K::Set);
                let path = get(fields, "args")
                    .and_then(Lean::as_array)
                    .into_iter()
                    .flatten()
                    .map(constant_text)
                    .collect::<Option<Vec<_>>>();
                match path {
                    Some(values) => {
                        // A value may be a folded name, a quoted name (case
                        // kept) or a string (`'a, B'`, split and folded by
                        // the server): the tree does not say which, so each
                        // spelling is taken as a possible schema.
                        let mut path = Vec::new();
                        for value in values {
                            path.extend(split_search_path(&value));
                            if !path.contains(&value) {
                                path.push(value);
                            }
                        }
                        self.parsed.effects.push(Effect::SearchPath(path))
                    }
                    None => self.problem("a search_path that is not a list of names"),
                }
            }
            "search_path" => {
                self.parsed.kinds.insert(K::Set);
                self.problem("SET search_path FROM CURRENT cannot be followed");
            }
            "application_name" if kind == VariableSetKind::VarSetValue as i32 => {
                self.parsed.kinds.insert(K::Set);
                let value = get(fields, "args")
                    .and_then(Lean::as_array)
                    .and_then(|args| args.first())
                    .and_then(constant_text);
                if let Some(reason) = value.as_deref().and_then(labelled_reason) {
                    self.parsed.effects.push(Effect::StatedReason(reason));
                }
            }
            _ if reset => self.parsed.kinds.insert(K::Reset),
            _ => self.parsed.kinds.insert(K::Set),
        }
    }

    /// `set_config(name, value, is_local)`: a `SET` by another spelling,
    /// followed when its setting and value are literals.
    fn set_config(&mut self, args: Option<&Lean>) {
        self.parsed.literal_sensitive = true;
        let args: Vec<&Lean> = args
            .and_then(Lean::as_array)
            .into_iter()
            .flatten()
            .collect();
        // pg_dump's spelling: `SELECT set_config(name, '…', false) FROM
        // pg_settings WHERE name = '…'` names the setting in its WHERE.
        let setting = args.first().and_then(|v| {
            constant_text(v).or_else(|| {
                let column = column_name(v)?;
                (column == "name").then(|| self.settings_row.clone())?
            })
        });
        let value = args.get(1).and_then(|v| constant_text(v));
        let (Some(setting), Some(value)) = (setting, value) else {
            self.problem(
                "set_config with a setting or value computed at run time cannot be followed",
            );
            return;
        };
        match setting.to_ascii_lowercase().as_str() {
            "role" | "session_authorization" => {
                self.parsed.kinds.insert(K::Other);
                self.parsed.effects.push(Effect::Role);
            }
            "search_path" => {
                self.parsed.kinds.insert(K::Set);
                self.parsed
                    .effects
                    .push(Effect::SearchPath(split_search_path(&value)));
            }
            "application_name" => {
                self.parsed.kinds.insert(K::Set);
                if let Some(reason) = labelled_reason(&value) {
                    self.parsed.effects.push(Effect::StatedReason(reason));
                }
            }
            _ => self.parsed.kinds.insert(K::Set),
        }
    }

    /// A qualified name as a list of strings (`DROP TABLE s.t`); `column`:
    /// the last part names a column of the relation before it.
    fn name_list(&mut self, object: &Lean, column: bool) {
        let list = object
            .get("List")
            .or_else(|| object.get("node")?.get("List"));
        let mut parts = strings(list.and_then(|l| l.get("items")));
        if column {
            parts.pop();
        }
        if let Some(name) = parts.pop() {
            self.parsed.relations.push(Name {
                schema: parts.pop(),
                name,
            });
        }
    }

    fn problem(&mut self, why: &str) {
        self.parsed.problem.get_or_insert_with(|| why.to_owned());
    }
}

/// How the values under `key` of a `node` are used, inside a use of
/// `around`.
fn field_use(node: &str, key: &str, around: Use) -> Use {
    let filter = matches!(
        key,
        "where_clause"
            | "having_clause"
            | "group_clause"
            | "sort_clause"
            | "window_clause"
            | "distinct_clause"
            | "limit_offset"
            | "limit_count"
            | "quals"
            | "join_condition"
            | "using_clause"
            | "locking_clause"
    );
    if around == Use::Filter || filter {
        return Use::Filter;
    }
    match (node, key) {
        ("SelectStmt", "larg" | "rarg") => around.inner(Use::SetOperation),
        ("SelectStmt", "from_clause") => around.inner(Use::Nested),
        ("SelectStmt", "values_lists") => around.inner(Use::Expression),
        (_, "returning_clause" | "returning_list") => Use::Returning,
        ("InsertStmt", _) | ("UpdateStmt", _) | ("MergeStmt", _) => Use::Write,
        ("CreateTableAsStmt" | "ViewStmt" | "RuleStmt" | "CopyStmt", _) => Use::Write,
        _ => around,
    }
}

/// Node type names are CamelCase; field names are snake_case.
fn is_node_type(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_uppercase())
}

/// The kind of a statement no arm of [`Walker::node`] names, by its node
/// type's name; `None` for nodes that are not statements.
fn kind_by_name(node: &str) -> Option<K> {
    if node.starts_with("Create")
        || matches!(
            node,
            "DefineStmt" | "ViewStmt" | "IndexStmt" | "RuleStmt" | "CompositeTypeStmt"
        )
    {
        Some(K::Create)
    } else if node.starts_with("Alter") || matches!(node, "RenameStmt" | "ReassignOwnedStmt") {
        Some(K::Alter)
    } else if node.starts_with("Drop") {
        Some(K::Drop)
    } else if node.ends_with("Stmt") {
        Some(K::Other)
    } else {
        None
    }
}

fn is_relation_type(objtype: i32) -> bool {
    [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectIndex,
        ObjectType::ObjectSequence,
        ObjectType::ObjectForeignTable,
    ]
    .iter()
    .any(|t| *t as i32 == objtype)
}

/// The `sval`s of a list of String nodes.
fn strings(list: Option<&Lean>) -> Vec<String> {
    list.and_then(Lean::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let string = item.get("node").unwrap_or(item).get("String")?;
            Some(string.get("sval")?.as_str()?.to_owned())
        })
        .collect()
}

/// The one row a SELECT reads when it is `FROM pg_settings WHERE name =
/// 'literal'`: that setting's name.
fn settings_row(select: &Fields) -> Option<String> {
    let from = get(select, "from_clause")?.as_array()?;
    let [relation] = from else {
        return None;
    };
    let relation = relation.get("node")?.get("RangeVar")?;
    let schema = relation.get("schemaname").and_then(Lean::as_str);
    if relation.get("relname")?.as_str()? != "pg_settings"
        || schema.is_some_and(|s| s != "pg_catalog")
    {
        return None;
    }
    let condition = get(select, "where_clause")?.get("node")?.get("AExpr")?;
    let operator = strings(condition.get("name"));
    if operator != ["="] || column_name(condition.get("lexpr")?)? != "name" {
        return None;
    }
    constant_text(condition.get("rexpr")?)
}

/// The column a bare column reference names (`name`), or None.
fn column_name(node: &Lean) -> Option<String> {
    let reference = node.get("node").unwrap_or(node).get("ColumnRef")?;
    match &strings(reference.get("fields"))[..] {
        [column] => Some(column.clone()),
        _ => None,
    }
}

/// The text of a string constant node (`'public'`), or None.
fn constant_text(node: &Lean) -> Option<String> {
    let constant = node.get("node").unwrap_or(node).get("AConst")?;
    let string = constant.get("val")?.get("Sval")?;
    // An empty string is a field at its default: left out of the tree.
    Some(
        string
            .get("sval")
            .and_then(Lean::as_str)
            .unwrap_or("")
            .to_owned(),
    )
}

/// `reason: INC-4211 cleanup` (an application_name, at startup or by
/// `SET`, or a comment's text): the reason, cut at 512 characters.
pub fn labelled_reason(value: &str) -> Option<String> {
    let (key, reason) = value.split_once(':')?;
    let reason = reason.trim();
    (key.trim().eq_ignore_ascii_case("reason") && !reason.is_empty())
        .then(|| reason.chars().take(512).collect())
}

/// A search_path value as `set_config` takes it: comma-separated names,
/// double quotes keeping case, others folded.
pub fn split_search_path(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => s.to_lowercase(),
            },
        )
        .collect()
}
