//! The adapter's settings: AdapterHub's presets (`seq_bn`, `double_seq_bn`, `par_bn`) and the
//! `BnConfig` fields a user may override, read from the method's config.

use graft_plugin_sdk::serde_json::{json, Value};
use graft_plugin_sdk::{Activation, ConfigKey, ConfigKind, MethodConfig};

/// Where the residual that the adapter's output is added to is taken (AdapterHub's
/// `residual_before_ln`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualFrom {
    /// The sublayer's output, before the residual add and the norm (`true`).
    Branch,
    /// The residual sum, before the norm (`"post_add"`).
    Sum,
    /// What the adapter reads, after the residual add and the norm (`false`).
    AdapterInput,
}

/// The initialisation of the projections (AdapterHub's `init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitWeights {
    /// Both projections N(0, 0.02), biases zero (`bert`): close to the identity.
    Bert,
    /// Down Kaiming-uniform (a = √5), up and biases zero (`mam_adapter`): exactly the identity.
    MamAdapter,
}

/// Every setting of one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The AdapterHub preset the settings started from.
    pub preset: &'static str,
    /// The adapter's name (several adapters may live in one model).
    pub name: String,
    /// An adapter after the self-attention block.
    pub mh_adapter: bool,
    /// An adapter after the feed-forward block.
    pub output_adapter: bool,
    /// An adapter after the cross-attention block (encoder-decoder models).
    pub cross_adapter: bool,
    /// Hidden width / bottleneck width.
    pub reduction_factor: f64,
    /// The nonlinearity, as written (`relu`, `swish`, ...).
    pub non_linearity: String,
    /// The parsed nonlinearity.
    pub activation: Activation,
    /// The adapter reads the normalized residual sum instead of the sublayer's output.
    pub original_ln_before: bool,
    /// The adapter's result is added to the stream and normalized by the layer's norm.
    pub original_ln_after: bool,
    /// Where the adapter's own residual comes from.
    pub residual_before_ln: ResidualFrom,
    /// Parallel adapter: reads the block's input stream, adds onto the sublayer's output.
    pub is_parallel: bool,
    /// The factor on the adapter's output.
    pub scaling: f64,
    /// How the projections start.
    pub init_weights: InitWeights,
    /// Dropout on the adapter's output (training only).
    pub dropout: f32,
    /// Layers (counted across stacks, encoder first) that get no adapter; static
    /// AdapterDrop's `drop_layers` lowest layers are among them.
    pub leave_out: Vec<usize>,
    /// Robust AdapterDrop: every training step drops the adapters of the lowest n layers, n
    /// drawn uniformly from 0 to the layer count − 1.
    pub robust_drop: bool,
    /// Also train the layers' norms (Houlsby et al. do).
    pub train_layer_norms: bool,
    /// The seed of the random init.
    pub seed: u64,
}

/// AdapterHub's preset names, with aliases.
pub const PRESETS: &str = "seq_bn (pfeiffer), double_seq_bn (houlsby), par_bn (parallel)";

/// Config keys whose default comes from the preset.
const PRESET_KEYS: &[&str] = &[
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "is_parallel",
    "scaling",
    "init_weights",
    "train_layer_norms",
];

/// The method's config keys.
pub fn config_keys() -> Vec<ConfigKey> {
    let preset = |key: &str, kind: ConfigKind, help: &str| {
        ConfigKey::new(
            key,
            kind,
            Value::Null,
            &format!("{help} (default: the preset's)"),
        )
    };
    vec![
        ConfigKey::string("config", "seq_bn", &format!("AdapterHub preset: {PRESETS}")),
        ConfigKey::string("name", "adapter", "the adapter's name; several adapters may be grafted onto one model"),
        preset("mh_adapter", ConfigKind::Bool, "an adapter after the self-attention block"),
        preset("output_adapter", ConfigKind::Bool, "an adapter after the feed-forward block"),
        ConfigKey::bool("cross_adapter", false, "an adapter after the cross-attention block"),
        preset("reduction_factor", ConfigKind::Float, "hidden width / bottleneck width (16, 16, 2); at least 1/16"),
        preset("non_linearity", ConfigKind::String, "relu, swish (silu), gelu, tanh or identity"),
        preset("original_ln_before", ConfigKind::Bool, "the adapter reads the layer's normalized residual sum"),
        preset("original_ln_after", ConfigKind::Bool, "the adapter's result is added to the stream and normalized by the layer's norm"),
        preset("residual_before_ln", ConfigKind::String, "the adapter's residual: true (sublayer output), post_add (the sum) or false (the adapter's input)"),
        preset("is_parallel", ConfigKind::Bool, "parallel: reads the block's input, adds onto the sublayer's output"),
        preset("scaling", ConfigKind::Float, "factor on the adapter's output (1, 1, 4)"),
        preset("init_weights", ConfigKind::String, "bert (both projections N(0, 0.02)) or mam_adapter (up projection zero: an exact no-op)"),
        ConfigKey::float("dropout", 0.0, "dropout on the adapter's output, training only"),
        ConfigKey::list("leave_out", &[], "layer indices (across stacks, encoder first) without adapters"),
        ConfigKey::int("drop_layers", 0, "static AdapterDrop: the lowest n layers get no adapter (added to leave_out), so inference is faster"),
        ConfigKey::bool("robust_drop", false, "robust AdapterDrop: each training step drops the adapters of the lowest n layers, n drawn from 0..layers-1 by graft's seeded generator; outside training the input adapter.<name>.dropped_layers (default 0) sets n, e.g. through `graft train --eval-sweep`"),
        preset("train_layer_norms", ConfigKind::Bool, "also train the layers' norms (true for double_seq_bn, as Houlsby et al.)"),
        ConfigKey::int("seed", 0, "seed of the random init"),
    ]
}

impl Settings {
    /// Reads the settings: the preset's values, overridden by every key the user gave.
    pub fn from_config(config: &MethodConfig) -> Result<Settings, String> {
        Settings::named(config, config.get_string("name")?)
    }

    /// [`Settings::from_config`] for an adapter named `name` (the config has no `name` key
    /// where one config describes several adapters, as an AdapterFusion's does; keys it does
    /// not have keep their defaults).
    pub fn named(config: &MethodConfig, name: String) -> Result<Settings, String> {
        let preset_name = config.get_string("config")?;
        let mut s = preset(&preset_name)?;
        s.name = name;
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "name \"{}\": use letters, digits, '_' or '-' (it becomes part of tensor names and AdapterHub keys)",
                s.name
            ));
        }
        for key in PRESET_KEYS.iter().filter(|k| config.is_given(k)) {
            match *key {
                "mh_adapter" => s.mh_adapter = config.get_bool(key)?,
                "output_adapter" => s.output_adapter = config.get_bool(key)?,
                "reduction_factor" => s.reduction_factor = config.get_f64(key)?,
                "non_linearity" => s.non_linearity = config.get_string(key)?,
                "original_ln_before" => s.original_ln_before = config.get_bool(key)?,
                "original_ln_after" => s.original_ln_after = config.get_bool(key)?,
                "residual_before_ln" => {
                    s.residual_before_ln = match config.get_string(key)?.to_lowercase().as_str() {
                        "true" => ResidualFrom::Branch,
                        "post_add" => ResidualFrom::Sum,
                        "false" => ResidualFrom::AdapterInput,
                        other => {
                            return Err(format!(
                            "residual_before_ln \"{other}\" is not one of: true, post_add, false"
                        ))
                        }
                    }
                }
                "is_parallel" => s.is_parallel = config.get_bool(key)?,
                "scaling" => s.scaling = config.get_f64(key)?,
                "init_weights" => {
                    s.init_weights = match config.get_string(key)?.as_str() {
                        "bert" => InitWeights::Bert,
                        "mam_adapter" => InitWeights::MamAdapter,
                        other => {
                            return Err(format!(
                                "init_weights \"{other}\" is not one of: bert, mam_adapter"
                            ))
                        }
                    }
                }
                "train_layer_norms" => s.train_layer_norms = config.get_bool(key)?,
                _ => {}
            }
        }
        s.cross_adapter = config.get_bool("cross_adapter")?;
        s.dropout = config.get_f32("dropout")?;
        s.seed = config.get_usize("seed")? as u64;
        s.leave_out = config
            .get_list("leave_out")?
            .iter()
            .map(|l| {
                l.parse::<usize>()
                    .map_err(|_| format!("leave_out: \"{l}\" is not a layer index"))
            })
            .collect::<Result<_, _>>()?;
        for layer in 0..config.get_usize("drop_layers")? {
            if !s.leave_out.contains(&layer) {
                s.leave_out.push(layer);
            }
        }
        s.leave_out.sort_unstable();
        s.robust_drop = config.get_bool("robust_drop")?;
        s.activation = s
            .non_linearity
            .parse()
            .map_err(|e| format!("non_linearity: {e}"))?;
        if !(s.reduction_factor.is_finite() && s.reduction_factor > 0.0) {
            return Err(format!(
                "reduction_factor {} must be a positive number",
                s.reduction_factor
            ));
        }
        if !s.scaling.is_finite() {
            return Err(format!("scaling {} must be a finite number", s.scaling));
        }
        if !(0.0..1.0).contains(&s.dropout) {
            return Err(format!("dropout {} is outside [0, 1)", s.dropout));
        }
        if !(s.mh_adapter || s.output_adapter || s.cross_adapter) {
            return Err(
                "mh_adapter, output_adapter and cross_adapter are all false: no adapter to add"
                    .into(),
            );
        }
        Ok(s)
    }

    /// The bottleneck width for a stream of width `hidden` (AdapterHub's
    /// `int(hidden // reduction_factor)`).
    pub fn bottleneck(&self, hidden: usize) -> usize {
        (hidden as f64 / self.reduction_factor).floor() as usize
    }

    /// Whether the adapter reads the block's (normalized) residual sum.
    pub fn reads_sum(&self) -> bool {
        self.original_ln_before && !self.is_parallel
    }

    /// AdapterHub's `config` object for these settings (a `BnConfig`).
    pub fn adapterhub_config(&self) -> Value {
        // AdapterHub 1.x writes no `architecture` key for bottleneck adapters.
        json!({
            "mh_adapter": self.mh_adapter,
            "output_adapter": self.output_adapter,
            "cross_adapter": self.cross_adapter,
            "reduction_factor": self.reduction_factor,
            "non_linearity": self.non_linearity,
            "original_ln_before": self.original_ln_before,
            "original_ln_after": self.original_ln_after,
            "residual_before_ln": match self.residual_before_ln {
                ResidualFrom::Branch => json!(true),
                ResidualFrom::Sum => json!("post_add"),
                ResidualFrom::AdapterInput => json!(false),
            },
            "adapter_residual_before_ln": false,
            "ln_before": false,
            "ln_after": false,
            "is_parallel": self.is_parallel,
            "scaling": self.scaling,
            "use_gating": false,
            "init_weights": match self.init_weights {
                InitWeights::Bert => "bert",
                InitWeights::MamAdapter => "mam_adapter",
            },
            "inv_adapter": null,
            "inv_adapter_reduction_factor": null,
            "leave_out": self.leave_out,
            "dropout": self.dropout,
            "phm_layer": false,
        })
    }
}

/// AdapterHub's preset `name` (or an alias).
fn preset(name: &str) -> Result<Settings, String> {
    let base = Settings {
        preset: "seq_bn",
        name: String::new(),
        mh_adapter: false,
        output_adapter: true,
        cross_adapter: false,
        reduction_factor: 16.0,
        non_linearity: "relu".into(),
        activation: Activation::Relu,
        original_ln_before: true,
        original_ln_after: true,
        residual_before_ln: ResidualFrom::Branch,
        is_parallel: false,
        scaling: 1.0,
        init_weights: InitWeights::Bert,
        dropout: 0.0,
        leave_out: Vec::new(),
        robust_drop: false,
        train_layer_norms: false,
        seed: 0,
    };
    match name.to_ascii_lowercase().as_str() {
        "seq_bn" | "pfeiffer" => Ok(base),
        "double_seq_bn" | "houlsby" => Ok(Settings {
            preset: "double_seq_bn",
            mh_adapter: true,
            non_linearity: "swish".into(),
            original_ln_before: false,
            train_layer_norms: true,
            ..base
        }),
        "par_bn" | "parallel" => Ok(Settings {
            preset: "par_bn",
            reduction_factor: 2.0,
            original_ln_before: false,
            is_parallel: true,
            scaling: 4.0,
            init_weights: InitWeights::MamAdapter,
            ..base
        }),
        other => Err(format!("config \"{other}\" is not one of: {PRESETS}")),
    }
}
