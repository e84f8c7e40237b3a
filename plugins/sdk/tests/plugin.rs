//! The full request/response cycle through the exported C table, as the core drives it.

mod common;

use common::{view, HIDDEN};
use graft_plugin_sdk::abi::{GraftBytes, GraftPluginTable, GRAFT_PLUGIN_ABI_VERSION};
use graft_plugin_sdk::quant::{quantize_blockwise, NF4_CODEBOOK};
use graft_plugin_sdk::{
    export_plugin, f32_to_bytes, ConfigKey, DType, Error, GraphView, Host, Init, MethodConfig,
    MethodDescription, NoTensors, PatchBuilder, PatchReply, Plugin, PluginClient, SiteKind,
};
use serde_json::json;
use std::collections::HashMap;
use std::ffi::CStr;

struct Demo;

impl Plugin for Demo {
    const NAME: &'static str = "demo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![
            MethodDescription::new(
                "qlora",
                "quantize targeted weights to NF4 and add LoRA",
                vec![
                    ConfigKey::int("r", 2, "rank"),
                    ConfigKey::list("targets", &["q"], "sites"),
                    ConfigKey::map("rank_pattern", &[], "per-label ranks"),
                ],
            ),
            MethodDescription::new("boom", "panics", vec![]),
        ]
    }

    fn patch(
        host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        if method == "boom" {
            panic!("kaboom");
        }
        let r = config.get_usize("r")?;
        let ranks = config.get_patterns::<usize>("rank_pattern")?;
        let mut b = PatchBuilder::new(graph, method);
        for s in config.get_sites("targets")?.select(graph) {
            let info = graph.tensor(&s.site.weight).ok_or("missing weight")?;
            let values = host.tensor_f32(info)?;
            let q = quantize_blockwise(&values, 16, &NF4_CODEBOOK)?;
            b.dequantize_weight(&info.name, q.codes, q.absmax, 16, &NF4_CODEBOOK)?;
            let r = ranks.for_site(s.site).copied().unwrap_or(r);
            let init_a = Init::linear_default(s.site.in_features, b.next_seed());
            b.low_rank_branch(s.site, r, 1.0, init_a, Init::Zeros, None)?;
        }
        Ok(b.finish())
    }
}

export_plugin!(Demo);

fn client() -> PluginClient<'static> {
    unsafe { PluginClient::from_raw(graft_plugin_entry()) }.unwrap()
}

fn weights(graph: &GraphView) -> HashMap<String, Vec<u8>> {
    graph
        .tensors
        .iter()
        .map(|t| {
            let n = t.numel().unwrap();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            (t.name.clone(), f32_to_bytes(t.dtype, &values).unwrap())
        })
        .collect()
}

#[test]
fn the_table_is_well_formed() {
    let table: &GraftPluginTable = unsafe { &*graft_plugin_entry() };
    assert_eq!(table.abi_version, GRAFT_PLUGIN_ABI_VERSION);
    assert_eq!(
        table.table_size as usize,
        std::mem::size_of::<GraftPluginTable>()
    );
    assert_eq!(
        unsafe { CStr::from_ptr(table.name) }.to_str().unwrap(),
        "demo"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(table.version) }.to_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    let c = client();
    assert_eq!((c.name(), c.version()), ("demo", env!("CARGO_PKG_VERSION")));
}

#[test]
fn describe_lists_methods_and_keys() {
    let d = client().describe().unwrap();
    assert_eq!(d, Demo::describe());
    assert_eq!(d.name, "demo");
    let qlora = d.method("qlora").unwrap();
    assert_eq!(qlora.config[0].key, "r");
    assert_eq!(qlora.config[0].default, json!(2));
    let raw = serde_json::to_value(&d).unwrap();
    assert_eq!(raw["methods"][0]["config"][1]["kind"], "list");
    assert_eq!(raw["methods"][0]["config"][2]["kind"], "map");
}

#[test]
fn patch_reads_host_tensors_and_carries_payloads() {
    let graph = view(DType::Float);
    let source = weights(&graph);
    let config = json!({"targets": "q,v", "rank_pattern": {"layers\\.1\\.": 3}});
    let reply = client().patch(&source, "qlora", &config, &graph).unwrap();
    reply.patch.check(&graph).unwrap();
    assert_eq!(reply.tensors.len(), 2 * 2 * 2);
    let layer1_q = reply
        .patch
        .parameters
        .iter()
        .find(|p| p.name == "qlora.encoder.layers.1.q.A")
        .unwrap();
    assert_eq!(layer1_q.shape, vec![HIDDEN, 3]);
    let q0 = graph.stacks[0].layers[0]
        .sites
        .iter()
        .find(|s| s.kind == SiteKind::Q)
        .unwrap();
    let values = graft_plugin_sdk::bytes_to_f32(DType::Float, &source[&q0.weight]).unwrap();
    let expected = quantize_blockwise(&values, 16, &NF4_CODEBOOK).unwrap();
    let codes = reply
        .tensors
        .iter()
        .find(|t| t.key == format!("qlora.{}.codes", q0.weight))
        .unwrap();
    assert_eq!(codes.data, expected.codes);
}

#[test]
fn errors_come_back_as_plugin_errors() {
    let graph = view(DType::Float);
    let c = client();
    let e = c
        .patch(&NoTensors, "qlora", &json!({"rr": 1}), &graph)
        .unwrap_err();
    assert_eq!(
        e,
        Error::Plugin(
            "unknown config key \"rr\" for method qlora; valid keys: r, targets, rank_pattern"
                .into()
        )
    );
    let e = c.patch(&NoTensors, "lora", &json!({}), &graph).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown method \"lora\" for plugin demo; valid methods: qlora, boom"
    );
    let e = c
        .patch(&NoTensors, "qlora", &json!({}), &graph)
        .unwrap_err();
    assert_eq!(e.to_string(), "the host has no tensor \"l0.q.weight\"");
    let e = c
        .patch(&NoTensors, "qlora", &json!({"rank_pattern": "(:2"}), &graph)
        .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "config key \"rank_pattern\" for method qlora has an invalid pattern \"(\""
        ),
        "{e}"
    );
    let e = c.call(&NoTensors, b"not json").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("plugin demo got an invalid request"),
        "{e}"
    );
}

#[test]
fn panics_become_error_replies() {
    let e = client()
        .patch(&NoTensors, "boom", &json!(null), &view(DType::Float))
        .unwrap_err();
    assert_eq!(e, Error::Plugin("plugin demo panicked: kaboom".into()));
}

#[test]
fn host_views_work_without_loading_a_library() {
    let graph = view(DType::Float16);
    let source = weights(&graph);
    let q = &graph.stacks[0].layers[0].sites[0];
    let info = graph.tensor(&q.weight).unwrap();
    Host::with_source(&source, |host| {
        assert_eq!(
            host.tensor_view(&q.weight).unwrap().len(),
            HIDDEN * HIDDEN * 2
        );
        assert!(host.tensor_view("missing").is_none());
        let values = host.tensor_f32(info).unwrap();
        assert_eq!(values.len(), HIDDEN * HIDDEN);
        let mut wrong = info.clone();
        wrong.shape = vec![3];
        assert!(host.tensor_f32(&wrong).is_err());
        let method = &Demo::methods()[0];
        let config = MethodConfig::new(method, &json!({"targets": ["k"]})).unwrap();
        let reply = Demo::patch(host, "qlora", &config, &graph).unwrap();
        assert_eq!(reply.patch.folds.len(), 2);
    });
    assert!(Host::empty().tensor_view("x").is_none());
}

#[test]
fn the_client_refuses_bad_tables() {
    unsafe extern "C" fn call(
        _: *const graft_plugin_sdk::abi::GraftHost,
        _: *const u8,
        _: usize,
        _: *mut GraftBytes,
    ) -> i32 {
        0
    }
    unsafe extern "C" fn free(_: GraftBytes) {}
    let good: &GraftPluginTable = unsafe { &*graft_plugin_entry() };
    let make = |abi_version, table_size, call_fn: bool| GraftPluginTable {
        abi_version,
        table_size,
        name: good.name,
        version: good.version,
        call: call_fn.then_some(call as graft_plugin_sdk::abi::CallFn),
        free: Some(free),
    };
    let size = std::mem::size_of::<GraftPluginTable>() as u32;
    let cases = [
        make(3, size, true),
        make(0, size, true),
        make(1, size - 8, true),
        make(1, size, false),
    ];
    for table in &cases {
        assert!(matches!(
            unsafe { PluginClient::from_raw(table) },
            Err(Error::Abi(_))
        ));
    }
    assert!(unsafe { PluginClient::from_raw(std::ptr::null()) }.is_err());
    let silent = make(1, size, true);
    let c = unsafe { PluginClient::from_raw(&silent) }.unwrap();
    assert!(matches!(c.describe(), Err(Error::Frame(_))));
}
