//! The `adapter_fusion` method: AdapterFusion (Pfeiffer et al., 2021), with the semantics,
//! settings and names of AdapterHub's `Fuse` composition and `BertFusion` layer.
//!
//! At every block that gets adapters, the N fused adapters read the same input `t` (the
//! block's normalized sum, or the sublayer's output, as a sequential adapter reads it) and
//! their scaled up-projections `u_i` are combined by attention over the adapters:
//!
//! ```text
//! Q = q · Wq + bq            q = t (query_before_ln: the sublayer's output h)
//! K_i = v_i · Wk + bk        v_i = u_i (+ r with residual_before)
//! V_i = v_i · Wv             (dynamic; static has no value matrix: V_i = v_i)
//! p = softmax_i(Q · K_i)     (dropout on the scores in training)
//! o = Σ_i p_i V_i + r        (r, the adapters' residual, added here unless residual_before)
//! ```
//!
//! and `o` takes the adapters' place in the block, as one adapter's output would. The
//! adapters' tensors have the names the `adapter` method gives them, so the values trained in
//! stage 1 (one adapter per task, each with `-m adapter --set name=…`) load by name
//! (`graft apply --values RUN/adapter.safetensors`); they stay frozen unless
//! `train_adapters`, so stage 2 trains the fusion only. The dynamic fusion's value matrices
//! start at the identity and are pulled towards it by a loss term `Σ ‖I − Wv‖²` with
//! AdapterHub's weight 0.01.

use graft_plugin_sdk::serde_json::{json, Value};
use graft_plugin_sdk::{
    AdapterHubFolder, AdapterHubKind, AttributeValue, ConfigKey, DType, GraphView, Init, LossTerm,
    MethodConfig, PatchBuilder, PatchReply, PeftFiles, PeftTensor,
};

use crate::adapterhub::{self, ADAPTERS_VERSION};
use crate::settings::{self, Settings};
use crate::switch::Switches;
use crate::{adapter_stem, finish_block, module, wanted, BlockValues};

/// AdapterHub's weight of the dynamic fusion's value regularizer.
const REGULARIZATION_WEIGHT: f64 = 0.01;

/// The fusion's dropout on the attention scores when the config leaves it `null`: AdapterHub
/// then uses the model's attention dropout, which is 0.1 for BERT-family models.
const DEFAULT_DROPOUT: f32 = 0.1;

/// The settings of one AdapterFusion layer (AdapterHub's `AdapterFusionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct FusionSettings {
    /// The fused adapters' names, in order.
    pub adapters: Vec<String>,
    /// `dynamic` or `static`.
    pub preset: &'static str,
    /// A key projection.
    pub key: bool,
    /// A query projection.
    pub query: bool,
    /// A value projection.
    pub value: bool,
    /// The query is the sublayer's output before the residual add and the norm.
    pub query_before_ln: bool,
    /// The value regularizer `Σ ‖I − Wv‖²` is a loss term.
    pub regularization: bool,
    /// The residual is added to each adapter's output before the attention.
    pub residual_before: bool,
    /// The value projection applies before the weighted sum (else after it).
    pub value_before_softmax: bool,
    /// The value projection starts at the identity.
    pub value_initialized: bool,
    /// Dropout on the attention scores as written (`None`: the model's attention dropout).
    pub dropout_prob: Option<f32>,
    /// Train the fused adapters too (AdapterHub's stage 2 keeps them frozen).
    pub train_adapters: bool,
}

impl FusionSettings {
    /// AdapterHub's name of the fusion: the adapters' names joined by `,`.
    pub fn name(&self) -> String {
        self.adapters.join(",")
    }

    /// The fusion's part of graft's tensor names: the adapters' names joined by `+`.
    fn tensor_name(&self) -> String {
        self.adapters.join("+")
    }

    /// AdapterHub's `config` object for these settings.
    fn adapterhub_config(&self) -> Value {
        json!({
            "dropout_prob": self.dropout_prob,
            "key": self.key,
            "query": self.query,
            "query_before_ln": self.query_before_ln,
            "regularization": self.regularization,
            "residual_before": self.residual_before,
            "temperature": false,
            "value": self.value,
            "value_before_softmax": self.value_before_softmax,
            "value_initialized": self.value_initialized,
        })
    }
}

/// The keys of the fusion's own settings; every `adapter` key but `name` also applies, to all
/// the fused adapters alike.
const FUSION_KEYS: &[&str] = &[
    "key",
    "query",
    "value",
    "query_before_ln",
    "regularization",
    "residual_before",
    "value_before_softmax",
    "value_initialized",
];

/// The method's config keys.
pub fn config_keys() -> Vec<ConfigKey> {
    let preset = |key: &str, help: &str| {
        ConfigKey::new(
            key,
            graft_plugin_sdk::ConfigKind::Bool,
            Value::Null,
            &format!("{help} (default: the fusion preset's)"),
        )
    };
    let mut keys = vec![
        ConfigKey::list("adapters", &[], "the fused adapters' names, at least two (required); each adapter's tensors are named as `-m adapter --set name=NAME` names them, so its trained values load by name"),
        ConfigKey::string("fusion", "dynamic", "AdapterHub fusion preset: dynamic (query, key and value; value starts at the identity and is regularized towards it) or static (no value matrix)"),
        preset("key", "a key projection"),
        preset("query", "a query projection"),
        preset("value", "a value projection"),
        preset("query_before_ln", "the query is the sublayer's output, before the residual add and the norm"),
        preset("regularization", "add Σ‖I − Wv‖² (weight 0.01) to the loss"),
        preset("residual_before", "add the residual to each adapter's output before the attention"),
        preset("value_before_softmax", "apply the value projection to each adapter's output (else to the weighted sum)"),
        preset("value_initialized", "the value projection starts at the identity"),
        ConfigKey::new("dropout_prob", graft_plugin_sdk::ConfigKind::Float, Value::Null, "dropout on the attention scores in training (default: 0.1, the attention dropout of BERT-family models, which AdapterHub uses when it is null)"),
        ConfigKey::bool("temperature", false, "AdapterHub's annealed softmax temperature; not supported (its value changes at every forward pass)"),
        ConfigKey::bool("train_adapters", false, "train the fused adapters too (default: frozen, as AdapterFusion's second stage)"),
    ];
    keys.extend(
        settings::config_keys()
            .into_iter()
            .filter(|k| k.key != "name"),
    );
    keys
}

impl FusionSettings {
    /// Reads the fusion's settings and those of the adapters it fuses.
    pub fn from_config(config: &MethodConfig) -> Result<(FusionSettings, Vec<Settings>), String> {
        let adapters = config.get_list("adapters")?;
        if adapters.len() < 2 {
            return Err(format!(
                "adapters: a fusion needs at least two adapters, got {adapters:?}"
            ));
        }
        for (i, name) in adapters.iter().enumerate() {
            if adapters[..i].contains(name) {
                return Err(format!("adapters: {name} is named twice"));
            }
        }
        let preset_name = config.get_string("fusion")?;
        let (preset, dynamic) = match preset_name.to_ascii_lowercase().as_str() {
            "dynamic" => ("dynamic", true),
            "static" => ("static", false),
            other => return Err(format!("fusion \"{other}\" is not one of: dynamic, static")),
        };
        let mut s = FusionSettings {
            adapters: adapters.clone(),
            preset,
            key: true,
            query: true,
            value: dynamic,
            query_before_ln: false,
            regularization: dynamic,
            residual_before: false,
            value_before_softmax: true,
            value_initialized: dynamic,
            dropout_prob: None,
            train_adapters: config.get_bool("train_adapters")?,
        };
        for key in FUSION_KEYS.iter().filter(|k| config.is_given(k)) {
            let value = config.get_bool(key)?;
            match *key {
                "key" => s.key = value,
                "query" => s.query = value,
                "value" => s.value = value,
                "query_before_ln" => s.query_before_ln = value,
                "regularization" => s.regularization = value,
                "residual_before" => s.residual_before = value,
                "value_before_softmax" => s.value_before_softmax = value,
                "value_initialized" => s.value_initialized = value,
                _ => {}
            }
        }
        if config.is_given("dropout_prob") {
            let p = config.get_f32("dropout_prob")?;
            if !(0.0..1.0).contains(&p) {
                return Err(format!("dropout_prob {p} is outside [0, 1)"));
            }
            s.dropout_prob = Some(p);
        }
        if config.get_bool("temperature")? {
            return Err("temperature: AdapterHub's annealed temperature (T from 50 down by T/1000 at every forward pass) is not supported; use temperature = false".into());
        }
        if !(s.query || s.key || s.value) {
            return Err("query, key and value are all false: AdapterHub then fuses through a single dense layer, which graft does not build".into());
        }
        let adapter_settings = adapters
            .iter()
            .map(|name| Settings::named(config, name.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let first = &adapter_settings[0];
        if first.is_parallel {
            return Err("AdapterFusion fuses sequential adapters (seq_bn, double_seq_bn); is_parallel adapters cannot be fused".into());
        }
        if first.robust_drop {
            return Err("robust_drop: robust AdapterDrop is not available on a fusion".into());
        }
        Ok((s, adapter_settings))
    }
}

/// The patch of an AdapterFusion: the fused adapters and a fusion layer at every block that
/// gets adapters.
pub fn patch(config: &MethodConfig, graph: &GraphView) -> Result<PatchReply, String> {
    let (fusion, adapters) = FusionSettings::from_config(config)?;
    let shared = &adapters[0];
    if graph.opset < 13 {
        return Err(format!(
            "AdapterFusion needs ONNX opset 13 or later (Unsqueeze and Squeeze with axes inputs); the model has opset {}",
            graph.opset
        ));
    }
    let prefix = format!("adapter_fusion.{}", fusion.tensor_name());
    let mut builder = PatchBuilder::new(graph, &prefix).with_seed(shared.seed);
    let n_layers = graph.stacks.iter().map(|s| s.n_layers).sum();
    let switches = Switches::new(&mut builder, &prefix, false, n_layers);
    let mut adapter_files: Vec<adapterhub::Files> =
        adapters.iter().map(adapterhub::Files::new).collect();
    let mut fusion_tensors = Vec::new();
    let mut unlabelled = false;
    let mut regularizers = Vec::new();
    let mut first_layer = 0;
    let mut hidden_size = 0;
    let mut n_blocks = 0;
    for stack in &graph.stacks {
        for layer in &stack.layers {
            let layer_id = first_layer + layer.index;
            if shared.leave_out.contains(&layer_id) {
                continue;
            }
            for block in layer.blocks.iter().filter(|b| wanted(shared, b.kind)) {
                n_blocks += 1;
                let keep = switches.keep(&mut builder, layer_id);
                let values = BlockValues::of(&builder, shared, block);
                let mut outputs = Vec::new();
                for (settings, files) in adapters.iter().zip(&mut adapter_files) {
                    let mut module = module(&mut builder, settings, stack)?;
                    // AdapterHub fuses the scaled up-projections before the adapters' dropout.
                    module.dropout = None;
                    let stem = adapter_stem(&mut builder, settings, stack, layer, block.kind);
                    let names = builder.bottleneck(&stem, &values.input, &module)?;
                    if !fusion.train_adapters {
                        for parameter in [&names.down, &names.down_bias, &names.up, &names.up_bias]
                        {
                            builder.freeze(parameter)?;
                        }
                    }
                    files.add(stack, layer, block.kind, &names);
                    outputs.push(names.output);
                }
                let stem = builder.stem(&format!(
                    "{prefix}.{}.{}.{}",
                    stack.name,
                    layer.index,
                    crate::location(block.kind)
                ));
                let query = if fusion.query_before_ln {
                    values.h.clone()
                } else {
                    values.input.clone()
                };
                let layer_fusion = fuse(
                    &mut builder,
                    &fusion,
                    &stem,
                    stack.hidden_size,
                    &query,
                    &outputs,
                    &values.residual,
                )?;
                hidden_size = stack.hidden_size;
                match adapterhub::fusion_module_path(layer, block.kind, &fusion.name()) {
                    Some(module) => {
                        fusion_tensors.extend(layer_fusion.tensors(&module, stack.hidden_size))
                    }
                    None => unlabelled = true,
                }
                if let Some(regularizer) = layer_fusion.regularizer {
                    regularizers.push(regularizer);
                }
                finish_block(
                    &mut builder,
                    shared,
                    graph,
                    &stem,
                    block,
                    &values,
                    &layer_fusion.output,
                    &keep,
                )?;
            }
        }
        first_layer += stack.n_layers;
    }
    if n_blocks == 0 {
        return Err(format!(
            "no block gets a fusion: {n_layers} layers, leave_out {:?}, mh_adapter {}, output_adapter {}",
            shared.leave_out, shared.mh_adapter, shared.output_adapter
        ));
    }
    let loss_term = (!regularizers.is_empty()).then(|| {
        let refs: Vec<&str> = regularizers.iter().map(String::as_str).collect();
        let total = builder.op(&format!("{prefix}.regularization"), "Sum", &refs, &[]);
        LossTerm {
            name: "regularization".into(),
            value: total,
            weight: REGULARIZATION_WEIGHT,
        }
    });
    let mut reply = builder.finish();
    reply.patch.training.loss_terms.extend(loss_term);
    if !unlabelled {
        let mut folders: Vec<AdapterHubFolder> = Vec::new();
        for (settings, files) in adapters.iter().zip(adapter_files) {
            if let Some(files) = files.finish(graph) {
                folders.push(AdapterHubFolder {
                    name: settings.name.clone(),
                    kind: AdapterHubKind::Adapter,
                    files,
                });
            }
        }
        folders.push(AdapterHubFolder {
            name: fusion.name(),
            kind: AdapterHubKind::Fusion,
            files: PeftFiles {
                config: json!({
                    "adapter_names": fusion.adapters,
                    "config": fusion.adapterhub_config(),
                    "hidden_size": hidden_size,
                    "model_type": adapterhub::model_type(graph),
                    "name": fusion.name(),
                    "version": ADAPTERS_VERSION,
                }),
                tensors: fusion_tensors,
                ..PeftFiles::default()
            },
        });
        reply.patch.training.adapterhub_folders = folders;
    }
    Ok(reply)
}

/// What [`fuse`] built at one block.
struct LayerFusion {
    /// The fused value, residual included: what takes the adapters' place in the block.
    output: String,
    /// `(AdapterHub's key suffix, graft tensor, transposed)` of the fusion's parameters.
    parameters: Vec<(&'static str, String, bool)>,
    /// `Σ (I − Wv)²` of this layer's value matrix, when regularized.
    regularizer: Option<String>,
}

impl LayerFusion {
    /// The AdapterHub tensors of this fusion layer under `module`.
    fn tensors(&self, module: &str, hidden: usize) -> Vec<PeftTensor> {
        self.parameters
            .iter()
            .map(|(key, tensor, transpose)| PeftTensor {
                key: format!("{module}.{key}"),
                tensor: tensor.clone(),
                transpose: *transpose,
                shape: if *transpose {
                    vec![hidden, hidden]
                } else {
                    vec![hidden]
                },
                rank_axis: None,
            })
            .collect()
    }
}

/// Builds AdapterHub's `BertFusion` over the adapters' `outputs` (each `[…, hidden]`) under
/// `stem`; see the module docs for the equations.
fn fuse(
    builder: &mut PatchBuilder<'_>,
    fusion: &FusionSettings,
    stem: &str,
    hidden: usize,
    query: &str,
    outputs: &[String],
    residual: &str,
) -> Result<LayerFusion, String> {
    let dtype = builder.value_dtype(query)?;
    let mut parameters = Vec::new();
    let normal = |builder: &mut PatchBuilder<'_>| Init::Normal {
        mean: 0.0,
        std: 0.02,
        seed: builder.next_seed(),
    };
    let mut linear = |builder: &mut PatchBuilder<'_>,
                      part: &'static str,
                      with_bias: bool,
                      init: Init|
     -> (String, Option<String>) {
        let weight = builder.parameter(
            &format!("{stem}.{part}"),
            dtype,
            vec![hidden, hidden],
            init,
            true,
        );
        parameters.push((weight_key(part), weight.clone(), true));
        let bias = with_bias.then(|| {
            let bias = builder.parameter(
                &format!("{stem}.{part}_bias"),
                dtype,
                vec![hidden],
                Init::Zeros,
                true,
            );
            parameters.push((bias_key(part), bias.clone(), false));
            bias
        });
        (weight, bias)
    };
    let apply = |builder: &mut PatchBuilder<'_>, name: &str, x: &str, w: &str, b: Option<&str>| {
        let y = builder.op(&format!("{stem}.{name}_matmul"), "MatMul", &[x, w], &[]);
        match b {
            Some(b) => builder.op(&format!("{stem}.{name}_add"), "Add", &[&y, b], &[]),
            None => y,
        }
    };
    let axis = builder.constant_ints(&format!("{stem}.adapter_axis"), &[-2]);
    // [..., n, hidden]: the adapters' outputs side by side.
    let unsqueezed: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let current = builder.current(o);
            builder.op(
                &format!("{stem}.stack_{i}"),
                "Unsqueeze",
                &[&current, &axis],
                &[],
            )
        })
        .collect();
    let refs: Vec<&str> = unsqueezed.iter().map(String::as_str).collect();
    let mut stacked = builder.op(
        &format!("{stem}.stack"),
        "Concat",
        &refs,
        &[("axis", AttributeValue::Int(-2))],
    );
    if fusion.residual_before {
        let r = builder.op(
            &format!("{stem}.residual_unsqueeze"),
            "Unsqueeze",
            &[residual, &axis],
            &[],
        );
        stacked = builder.op(&format!("{stem}.residual_add"), "Add", &[&stacked, &r], &[]);
    }
    let q = if fusion.query {
        let init = normal(builder);
        let (w, b) = linear(builder, "query", true, init);
        apply(builder, "query", query, &w, b.as_deref())
    } else {
        query.to_owned()
    };
    let k = if fusion.key {
        let init = normal(builder);
        let (w, b) = linear(builder, "key", true, init);
        apply(builder, "key", &stacked, &w, b.as_deref())
    } else {
        stacked.clone()
    };
    let mut regularizer = None;
    let value_weight = if fusion.value {
        let init = if fusion.value_initialized {
            identity_init(builder, stem, hidden, dtype)?
        } else {
            normal(builder)
        };
        let (w, _) = linear(builder, "value", false, init);
        if fusion.regularization {
            let eye = builder.op(&format!("{stem}.identity"), "EyeLike", &[&w], &[]);
            let diff = builder.op(&format!("{stem}.value_offset"), "Sub", &[&eye, &w], &[]);
            let square = builder.op(&format!("{stem}.value_square"), "Mul", &[&diff, &diff], &[]);
            let mut sum = builder.op(
                &format!("{stem}.value_sum"),
                "ReduceSum",
                &[&square],
                &[("keepdims", AttributeValue::Int(0))],
            );
            if dtype != DType::Float {
                sum = builder.op(
                    &format!("{stem}.value_sum_float"),
                    "Cast",
                    &[&sum],
                    &[("to", AttributeValue::Int(DType::Float.onnx_code() as i64))],
                );
            }
            regularizer = Some(sum);
        }
        Some(w)
    } else {
        None
    };
    let v = match (&value_weight, fusion.value_before_softmax) {
        (Some(w), true) => apply(builder, "value", &stacked, w, None),
        _ => stacked.clone(),
    };
    // Scores [..., 1, n] = Q[..., 1, hidden] · K[..., n, hidden]ᵀ.
    let q = builder.op(
        &format!("{stem}.query_unsqueeze"),
        "Unsqueeze",
        &[&q, &axis],
        &[],
    );
    let kt = builder.op(
        &format!("{stem}.key_transpose"),
        "Transpose",
        &[&k],
        &[("perm", AttributeValue::Ints(vec![0, 1, 3, 2]))],
    );
    let mut scores = builder.op(&format!("{stem}.scores"), "MatMul", &[&q, &kt], &[]);
    let p = fusion.dropout_prob.unwrap_or(DEFAULT_DROPOUT);
    if p > 0.0 {
        let ratio = builder.op(
            &format!("{stem}.dropout_ratio"),
            "Constant",
            &[],
            &[("value_float", AttributeValue::Float(p))],
        );
        scores = builder.op(
            &format!("{stem}.dropout"),
            "Dropout",
            &[&scores, &ratio],
            &[],
        );
    }
    let probabilities = builder.op(
        &format!("{stem}.softmax"),
        "Softmax",
        &[&scores],
        &[("axis", AttributeValue::Int(-1))],
    );
    let context = builder.op(
        &format!("{stem}.context"),
        "MatMul",
        &[&probabilities, &v],
        &[],
    );
    let mut context = builder.op(
        &format!("{stem}.context_squeeze"),
        "Squeeze",
        &[&context, &axis],
        &[],
    );
    if let (Some(w), false) = (&value_weight, fusion.value_before_softmax) {
        context = apply(builder, "value", &context, w, None);
    }
    if !fusion.residual_before {
        context = builder.op(
            &format!("{stem}.add_residual"),
            "Add",
            &[&context, residual],
            &[],
        );
    }
    Ok(LayerFusion {
        output: context,
        parameters,
        regularizer,
    })
}

/// AdapterHub's `value_initialized` start: the identity with 1e-6 everywhere else.
fn identity_init(
    builder: &mut PatchBuilder<'_>,
    stem: &str,
    hidden: usize,
    dtype: DType,
) -> Result<Init, String> {
    let values: Vec<f32> = (0..hidden * hidden)
        .map(|i| if i / hidden == i % hidden { 1.0 } else { 1e-6 })
        .collect();
    let bytes = graft_plugin_sdk::f32_to_bytes(dtype, &values)
        .ok_or_else(|| format!("a fusion's value matrix cannot be {}", dtype.name()))?;
    builder
        .data(
            &format!("{stem}.value_identity"),
            dtype,
            vec![hidden, hidden],
            bytes,
        )
        .map_err(|e| e.to_string())
}

/// AdapterHub's key of a fusion projection's weight.
fn weight_key(part: &str) -> &'static str {
    match part {
        "query" => "query.weight",
        "key" => "key.weight",
        _ => "value.weight",
    }
}

/// AdapterHub's key of a fusion projection's bias.
fn bias_key(part: &str) -> &'static str {
    match part {
        "query" => "query.bias",
        _ => "key.bias",
    }
}
