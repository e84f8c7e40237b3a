//! A small two-layer encoder view shared by the integration tests.

#![allow(dead_code)]

use graft_plugin_sdk::{
    AttentionKind, DType, Dim, Embedding, EmbeddingKind, GraphView, Layer, Site, SiteKind, Stack,
    TensorInfo, ValueInfo, WeightLayout,
};

pub const HIDDEN: usize = 8;
pub const FFN: usize = 16;

fn site(layer: usize, kind: SiteKind, in_f: usize, out_f: usize, input: &str, bias: bool) -> Site {
    let base = format!("l{layer}.{}", kind.name());
    Site {
        kind,
        attention: kind.is_attention().then_some(AttentionKind::SelfAttention),
        node: format!("{base}.MatMul"),
        weight: format!("{base}.weight"),
        label: Some(format!("encoder.layers.{layer}.{}", kind.name())),
        in_features: in_f,
        out_features: out_f,
        layout: if kind == SiteKind::O {
            WeightLayout::OutIn
        } else {
            WeightLayout::InOut
        },
        bias: bias.then(|| format!("{base}.bias")),
        input: input.into(),
        output: format!("{base}.out"),
        key_states: (kind == SiteKind::K).then(|| format!("l{layer}.keys")),
        value_states: (kind == SiteKind::V).then(|| format!("l{layer}.values")),
        split: Vec::new(),
    }
}

/// Two layers with q, k, v, o, ffn_up, ffn_down (biased) and a norm, in `dtype`.
pub fn view(dtype: DType) -> GraphView {
    let mut stack = Stack {
        name: "encoder".into(),
        n_layers: 2,
        hidden_size: HIDDEN,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: None,
        layers: vec![],
        ..Stack::default()
    };
    let mut tensors = vec![TensorInfo {
        name: "tok.weight".into(),
        dtype,
        shape: vec![50, HIDDEN as i64],
    }];
    let mut values = vec![
        ValueInfo {
            name: "input_ids".into(),
            dtype: Some(DType::Int64),
            shape: Some(vec![
                Dim::Symbolic("batch".into()),
                Dim::Symbolic("seq".into()),
            ]),
        },
        ValueInfo {
            name: "attention_mask".into(),
            dtype: Some(DType::Int64),
            shape: Some(vec![
                Dim::Symbolic("batch".into()),
                Dim::Symbolic("seq".into()),
            ]),
        },
        ValueInfo {
            name: "embeddings".into(),
            dtype: Some(dtype),
            shape: Some(vec![
                Dim::Symbolic("batch".into()),
                Dim::Symbolic("seq".into()),
                Dim::Fixed(HIDDEN as i64),
            ]),
        },
    ];
    for l in 0..2 {
        let x = if l == 0 {
            "embeddings".to_string()
        } else {
            "l0.norm.out".to_string()
        };
        let sites = vec![
            site(l, SiteKind::Q, HIDDEN, HIDDEN, &x, true),
            site(l, SiteKind::K, HIDDEN, HIDDEN, &x, true),
            site(l, SiteKind::V, HIDDEN, HIDDEN, &x, true),
            site(
                l,
                SiteKind::O,
                HIDDEN,
                HIDDEN,
                &format!("l{l}.context"),
                false,
            ),
            site(
                l,
                SiteKind::FfnUp,
                HIDDEN,
                FFN,
                &format!("l{l}.o.out"),
                true,
            ),
            site(
                l,
                SiteKind::FfnDown,
                FFN,
                HIDDEN,
                &format!("l{l}.act"),
                true,
            ),
            site(
                l,
                SiteKind::Norm,
                HIDDEN,
                HIDDEN,
                &format!("l{l}.ffn_down.out"),
                true,
            ),
        ];
        for s in &sites {
            let shape = match s.layout {
                WeightLayout::InOut => vec![s.in_features as i64, s.out_features as i64],
                WeightLayout::OutIn => vec![s.out_features as i64, s.in_features as i64],
            };
            let shape = if s.kind == SiteKind::Norm {
                vec![HIDDEN as i64]
            } else {
                shape
            };
            tensors.push(TensorInfo {
                name: s.weight.clone(),
                dtype,
                shape,
            });
            if let Some(b) = &s.bias {
                tensors.push(TensorInfo {
                    name: b.clone(),
                    dtype,
                    shape: vec![s.out_features as i64],
                });
            }
            values.push(ValueInfo {
                name: s.output.clone(),
                dtype: Some(dtype),
                shape: None,
            });
        }
        for v in [format!("l{l}.keys"), format!("l{l}.values")] {
            values.push(ValueInfo {
                name: v,
                dtype: Some(dtype),
                shape: None,
            });
        }
        stack.layers.push(Layer {
            index: l,
            sites,
            ..Layer::default()
        });
    }
    let node_names = stack
        .layers
        .iter()
        .flat_map(|layer| layer.sites.iter().map(|s| s.node.clone()))
        .chain(["tok.Gather".to_string()])
        .collect();
    GraphView {
        opset: 17,
        producer: "test".into(),
        stacks: vec![stack],
        embeddings: vec![Embedding {
            kind: EmbeddingKind::Token,
            node: "tok.Gather".into(),
            weight: "tok.weight".into(),
            output: "embeddings".into(),
            label: Some("embeddings.word".into()),
            n_embeddings: 50,
            dim: HIDDEN,
        }],
        heads: vec![],
        tensors,
        values,
        node_names,
        inputs: vec!["input_ids".into(), "attention_mask".into()],
        outputs: vec!["l1.norm.out".into()],
        record: Default::default(),
        ..GraphView::default()
    }
}

/// The site of `kind` in `layer`.
pub fn site_of(graph: &GraphView, layer: usize, kind: SiteKind) -> Site {
    graph.stacks[0].layers[layer]
        .sites
        .iter()
        .find(|s| s.kind == kind)
        .unwrap()
        .clone()
}
