//! `DO` blocks: their PL/pgSQL body parsed with PostgreSQL's own PL/pgSQL
//! parser, and every SQL statement and expression in it analysed like a
//! statement of its own, so a `DELETE` inside a `DO` is a `delete`. SQL the
//! body builds at run time (`EXECUTE`) cannot be checked.
use serde_json::Value;

/// Every piece of SQL in a PL/pgSQL body, with the parse mode PostgreSQL
/// gives it (a statement, an expression, an assignment).
pub fn sql_of(body: &str) -> Result<Vec<(String, i32)>, String> {
    const QUOTE: &str = "$interlock_do$";
    if body.contains(QUOTE) {
        return Err("a DO body that contains the agent's own quote cannot be analysed".into());
    }
    let function = format!(
        "CREATE FUNCTION interlock_do() RETURNS void LANGUAGE plpgsql AS {QUOTE}{body}{QUOTE}"
    );
    let tree =
        pg_query::parse_plpgsql(&function).map_err(|e| format!("its body does not parse: {e}"))?;
    let mut pieces = Vec::new();
    collect(&tree, &mut pieces)?;
    Ok(pieces)
}

fn collect(value: &Value, pieces: &mut Vec<(String, i32)>) -> Result<(), String> {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key.starts_with("PLpgSQL_stmt_dyn") || key == "dynquery" {
                    return Err(
                        "it runs SQL built at run time (EXECUTE), which cannot be checked".into(),
                    );
                }
                if key == "PLpgSQL_expr"
                    && let Some(query) = child.get("query").and_then(Value::as_str)
                {
                    let mode = child.get("parseMode").and_then(Value::as_i64).unwrap_or(0);
                    pieces.push((query.to_owned(), mode as i32));
                }
                collect(child, pieces)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(item, pieces)?;
            }
        }
        _ => {}
    }
    Ok(())
}
