//! What the fuzz targets (`fuzz/`) drive: every parser of PostgreSQL bytes
//! that come from a workload or a server. None may panic, whatever the
//! bytes.
use std::sync::Arc;

use bytes::BytesMut;

use super::{
    catalog, names,
    sql::{self, Literals},
    wire,
};

/// Startup packets, frames, and the fields the proxy reads from them.
pub fn frames(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut reader = data;
        let _ = wire::read_startup(&mut reader).await;
        let mut reader = data;
        let mut buf = BytesMut::new();
        while let Ok(Some(frame)) = wire::read_frame(&mut reader, &mut buf).await {
            let body = frame.body();
            let _ = wire::query_text(body);
            let _ = wire::parse_fields(body);
            let _ = wire::bind_names(body);
            let _ = wire::execute_portal(body);
            let _ = wire::target_name(body, "Describe");
            let _ = catalog::text_values(body);
            let _ = super::cancel::backend_key(&frame);
        }
    });
}

/// A statement text through analysis and name resolution.
pub fn sql(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let catalog = names::SystemCatalog {
        relations: ["pg_class".to_owned()].into(),
        functions: [("lower".to_owned(), false), ("random".to_owned(), true)].into(),
    };
    let mut names = names::Names::new(
        Arc::new(catalog),
        vec!["pg_catalog".into(), "public".into()],
        "app".into(),
    );
    for literals in [Literals::Keep, Literals::Redact] {
        for analysed in sql::analyze(text, literals) {
            let _ = names.resolve(&analysed);
            names.apply(&analysed.parsed.effects);
        }
    }
}
