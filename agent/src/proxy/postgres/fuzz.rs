//! What the fuzz targets (`fuzz/`) drive: every parser of PostgreSQL bytes
//! that come from a workload or a server. None may panic, whatever the
//! bytes.
use super::rows::RowPlan;
use crate::masking::MaskSet;
use std::sync::{Arc, LazyLock};

use bytes::BytesMut;

use super::{
    catalog, names,
    sql::{self, Literals},
    wire,
};

/// Startup packets, frames, and the fields the proxy reads from them;
/// RowDescriptions and DataRows through masking.
pub fn frames(data: &[u8]) {
    // Made once: compiling masks per input would be most of the work.
    static MASKS: LazyLock<Option<MaskSet>> = LazyLock::new(|| {
        let masks = compile_masks(&[
            r#"column = "email""#,
            r#"column = "customers.card""#,
            r#"pattern = "card_number""#,
            r#"regex = "ORD-[0-9]+""#,
        ]);
        let refs: Vec<&crate::policy::Mask> = masks.iter().collect();
        let resolved = [(
            crate::policy::ColumnName::parse("customers.card").expect("a valid name"),
            vec![(16384, 2)],
        )]
        .into();
        MaskSet::compile(
            &refs,
            &resolved,
            Arc::new(crate::masking::MaskKey::new([7; 32])),
        )
        .ok()
    });
    let set = MASKS.as_ref();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        // A startup packet, then messages; or messages alone.
        let mut reader = data;
        if wire::read_startup(&mut reader).await.is_err() {
            reader = data;
        }
        let mut buf = BytesMut::new();
        let mut plan = None;
        while let Ok(Some(frame)) = wire::read_frame(&mut reader, &mut buf).await {
            if let Some(set) = set {
                match frame.tag {
                    b'T' => plan = RowPlan::new(set, frame.body()).ok(),
                    b'D' => {
                        if let Some(plan) = &plan {
                            let _ = plan.mask_row(set, &frame.bytes, &mut BytesMut::new());
                        }
                    }
                    _ => {}
                }
            }
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

/// Masks as a policy file writes them (`column = "email"`).
pub(crate) fn compile_masks(specs: &[&str]) -> Vec<crate::policy::Mask> {
    specs
        .iter()
        .map(|spec| {
            toml::from_str::<crate::policy::MaskSpec>(spec)
                .expect("a valid mask")
                .compile()
                .expect("a valid mask")
        })
        .collect()
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
