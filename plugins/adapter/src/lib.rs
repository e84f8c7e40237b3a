//! The `adapter` method plugin: bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al.,
//! 2021; He et al., 2022's parallel adapter) with the semantics and names of AdapterHub's
//! `adapters` library, so that its saved adapters load here and graft's load there.
//!
//! Each adapter is `scaling · up(act(down(t)))` placed at a layer's residual block — where a
//! sublayer's result `h` meets the residual stream `x` in `LN(h + x)` (post-norm) or `h + x`
//! (pre-norm, where AdapterHub applies no norm there) — wired as AdapterHub's
//! `BottleneckLayer` does:
//!
//! - sequential (`seq_bn`, `double_seq_bn`): the adapter reads `t = h`, or with
//!   `original_ln_before` the block's normalized sum `LN(h + x)`; its output is added to a
//!   residual (`residual_before_ln`: `h`, the sum, or `t`); with `original_ln_after` the result
//!   `o` replaces `h` in the block (`LN(o + x)`), otherwise it replaces the block's output.
//! - parallel (`par_bn`): the adapter reads `x` and `h + adapter(x)` replaces `h`.
//!
//! Adapters are not linear in their input, so they record no fold: `graft merge` refuses them
//! and `graft export` writes them (a patched graph, ONNX Runtime adapters, or AdapterHub files).
//! With `train_layer_norms` the layers' norms train in place and merge into the norm weights.

mod adapterhub;
mod fusion;
mod settings;
mod switch;

use graft_plugin_sdk::{
    export_plugin, AttributeValue, BlockKind, Bottleneck, GraphView, Host, Init, Layer,
    MethodConfig, MethodDescription, NormInfo, NormKind, PatchBuilder, PatchReply, Plugin,
    ResidualBlock, SiteKind, Stack,
};

use settings::{InitWeights, ResidualFrom, Settings};
use switch::Switches;

/// Bottleneck adapters, configured like AdapterHub's `BnConfig`.
pub struct Adapter;

impl Plugin for Adapter {
    const NAME: &'static str = "adapter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![
            MethodDescription::new(
                "adapter",
                "bottleneck adapters at the layers' residual blocks: AdapterHub's seq_bn (Pfeiffer), double_seq_bn (Houlsby), par_bn (parallel)",
                settings::config_keys(),
            ),
            MethodDescription::new(
                "adapter_fusion",
                "AdapterFusion: attention over several adapters' outputs at every block (AdapterHub's Fuse), the adapters frozen",
                fusion::config_keys(),
            ),
        ]
    }

    fn patch(
        _host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        match method {
            "adapter_fusion" => fusion::patch(config, graph),
            _ => patch_adapters(config, graph),
        }
    }
}

/// The patch of the `adapter` method: one adapter at every block the settings name.
fn patch_adapters(config: &MethodConfig, graph: &GraphView) -> Result<PatchReply, String> {
    let settings = Settings::from_config(config)?;
    let mut builder =
        PatchBuilder::new(graph, &format!("adapter.{}", settings.name)).with_seed(settings.seed);
    let mut hub = adapterhub::Files::new(&settings);
    let n_layers = graph.stacks.iter().map(|s| s.n_layers).sum();
    let switches = Switches::new(
        &mut builder,
        &format!("adapter.{}", settings.name),
        settings.robust_drop,
        n_layers,
    );
    let mut n_adapters = 0;
    let mut first_layer = 0;
    for stack in &graph.stacks {
        for layer in &stack.layers {
            let layer_id = first_layer + layer.index;
            if settings.leave_out.contains(&layer_id) {
                continue;
            }
            let blocks: Vec<_> = layer
                .blocks
                .iter()
                .filter(|b| wanted(&settings, b.kind))
                .collect();
            let keep = if blocks.is_empty() {
                String::new()
            } else {
                switches.keep(&mut builder, layer_id)
            };
            for block in blocks {
                let names =
                    add_adapter(&mut builder, &settings, graph, stack, layer, block, &keep)?;
                hub.add(stack, layer, block.kind, &names);
                n_adapters += 1;
            }
            if settings.train_layer_norms && n_adapters > 0 {
                for norm in layer.sites.iter().filter(|s| s.kind == SiteKind::Norm) {
                    builder.mark_trainable(&norm.weight)?;
                    if let Some(bias) = &norm.bias {
                        builder.mark_trainable(bias)?;
                    }
                }
            }
        }
        first_layer += stack.n_layers;
    }
    if n_adapters == 0 {
        return Err(no_block_message(graph, &settings));
    }
    let mut reply = builder.finish();
    reply.patch.training.adapterhub = hub.finish(graph);
    Ok(reply)
}

/// Whether the settings put an adapter on a block of `kind`.
pub(crate) fn wanted(settings: &Settings, kind: BlockKind) -> bool {
    match kind {
        BlockKind::SelfAttention => settings.mh_adapter,
        BlockKind::CrossAttention => settings.cross_adapter,
        BlockKind::Ffn => settings.output_adapter,
    }
}

/// The short name of a block's adapter location in tensor names.
pub(crate) fn location(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::SelfAttention => "attention",
        BlockKind::CrossAttention => "cross_attention",
        BlockKind::Ffn => "output",
    }
}

/// The tensor-name stem of `settings`' adapter at `block` of `layer`:
/// `adapter.<name>.<stack>.<layer>.<attention|cross_attention|output>`.
pub(crate) fn adapter_stem(
    builder: &mut PatchBuilder<'_>,
    settings: &Settings,
    stack: &Stack,
    layer: &Layer,
    kind: BlockKind,
) -> String {
    builder.stem(&format!(
        "adapter.{}.{}.{}.{}",
        settings.name,
        stack.name,
        layer.index,
        location(kind)
    ))
}

/// The widest bottleneck, as a multiple of the stream's width: a smaller `reduction_factor`
/// (a corrupt or careless config) would allocate adapters many times the model's own size.
const MAX_WIDENING: usize = 16;

/// The bottleneck module `settings` describe for a stream of `stack`'s width, with
/// AdapterHub's init (seeds drawn from `builder`).
pub(crate) fn module(
    builder: &mut PatchBuilder<'_>,
    settings: &Settings,
    stack: &Stack,
) -> Result<Bottleneck, String> {
    let hidden = stack.hidden_size;
    let bottleneck = settings.bottleneck(hidden);
    if bottleneck == 0 {
        return Err(format!(
            "reduction_factor {} leaves no bottleneck for the {}-wide stream of stack {}",
            settings.reduction_factor, hidden, stack.name
        ));
    }
    if bottleneck > MAX_WIDENING * hidden {
        return Err(format!(
            "reduction_factor {} makes a {bottleneck}-wide bottleneck, more than {MAX_WIDENING} \
             times the {hidden}-wide stream of stack {}; the smallest reduction_factor is 1/{MAX_WIDENING}",
            settings.reduction_factor, stack.name
        ));
    }
    let seed = builder.next_seed();
    let (init_down, init_up) = match settings.init_weights {
        InitWeights::Bert => {
            let normal = |seed| Init::Normal {
                mean: 0.0,
                std: 0.02,
                seed,
            };
            let up_seed = builder.next_seed();
            (normal(seed), normal(up_seed))
        }
        InitWeights::MamAdapter => (Init::linear_default(hidden, seed), Init::Zeros),
    };
    Ok(Bottleneck {
        hidden,
        bottleneck,
        activation: settings.activation,
        scaling: settings.scaling,
        dropout: Some(settings.dropout).filter(|&p| p > 0.0),
        init_down,
        init_up,
    })
}

/// What an adapter at one residual block reads and adds to (AdapterHub's `pre_forward`), as
/// left by earlier rewires.
pub(crate) struct BlockValues {
    /// The sublayer's output `h`.
    pub h: String,
    /// The residual stream `x` the block adds `h` to.
    pub x: String,
    /// What a sequential adapter reads: `h`, or with `original_ln_before` the block's
    /// (normalized) sum.
    pub input: String,
    /// What a sequential adapter's output is added to (`residual_before_ln`).
    pub residual: String,
}

impl BlockValues {
    /// The values of `block` for an adapter configured by `settings`.
    pub fn of(builder: &PatchBuilder<'_>, settings: &Settings, block: &ResidualBlock) -> Self {
        let h = builder.current(&block.branch);
        let x = builder.current(&block.skip);
        // What the block hands on: its normalized sum in a post-norm layer, else the sum.
        let block_output = block
            .post_norm
            .as_ref()
            .map_or(block.sum.clone(), |n| n.output.clone());
        let input = if settings.reads_sum() {
            builder.current(&block_output)
        } else {
            h.clone()
        };
        let residual = match (settings.reads_sum(), settings.residual_before_ln) {
            (false, _) | (true, ResidualFrom::Branch) => h.clone(),
            (true, ResidualFrom::Sum) => builder.current(&block.sum),
            (true, ResidualFrom::AdapterInput) => input.clone(),
        };
        BlockValues {
            h,
            x,
            input,
            residual,
        }
    }
}

/// Builds one adapter at `block` and wires it in as AdapterHub's `BottleneckLayer` does,
/// computing where `keep` (a bool scalar) holds.
#[allow(clippy::too_many_arguments)]
fn add_adapter(
    builder: &mut PatchBuilder<'_>,
    settings: &Settings,
    graph: &GraphView,
    stack: &Stack,
    layer: &Layer,
    block: &ResidualBlock,
    keep: &str,
) -> Result<graft_plugin_sdk::BottleneckNames, String> {
    let module = module(builder, settings, stack)?;
    let stem = adapter_stem(builder, settings, stack, layer, block.kind);
    let values = BlockValues::of(builder, settings, block);
    let (names, with_adapter) = if settings.is_parallel {
        let names = builder.bottleneck(&stem, &values.x, &module)?;
        let sum = builder.op(
            &format!("{stem}.add"),
            "Add",
            &[&values.h, &names.output],
            &[],
        );
        (names, sum)
    } else {
        let names = builder.bottleneck(&stem, &values.input, &module)?;
        let sum = builder.op(
            &format!("{stem}.add_residual"),
            "Add",
            &[&names.output, &values.residual],
            &[],
        );
        (names, sum)
    };
    finish_block(
        builder,
        settings,
        graph,
        &stem,
        block,
        &values,
        &with_adapter,
        keep,
    )?;
    Ok(names)
}

/// AdapterHub's `post_forward`: with `original_ln_after`, `with_adapter` takes `h`'s place in
/// the block (`LN(with_adapter + x)`); otherwise it is the block's output itself. When the
/// adapter read nothing downstream of `h`, the block's own add and norm are reused by rewiring
/// `h`; otherwise they stay for the adapter and a copy computes the block's new output. The
/// replaced value is kept where `keep` is false (see [`switch`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_block(
    builder: &mut PatchBuilder<'_>,
    settings: &Settings,
    graph: &GraphView,
    stem: &str,
    block: &ResidualBlock,
    values: &BlockValues,
    with_adapter: &str,
    keep: &str,
) -> Result<(), String> {
    let norm = block.post_norm.as_ref();
    if settings.original_ln_after && !settings.reads_sum() {
        let switched = switch::select(builder, stem, keep, with_adapter, &values.h);
        builder.rewire(&values.h, &switched);
        return Ok(());
    }
    let output = if settings.original_ln_after {
        let sum = builder.op(
            &format!("{stem}.add_skip"),
            "Add",
            &[with_adapter, &values.x],
            &[],
        );
        match norm {
            Some(norm) => apply_norm(builder, graph, stem, norm, &sum)?,
            None => sum,
        }
    } else {
        with_adapter.to_owned()
    };
    let block_output = norm.map_or(block.sum.as_str(), |n| n.output.as_str());
    let base = builder.current(block_output);
    let switched = switch::select(builder, stem, keep, &output, &base);
    builder.rewire(block_output, &switched);
    Ok(())
}

/// Applies the same normalization as `norm` (same scale, shift and epsilon) to `value`.
fn apply_norm(
    builder: &mut PatchBuilder<'_>,
    graph: &GraphView,
    stem: &str,
    norm: &NormInfo,
    value: &str,
) -> Result<String, String> {
    let epsilon = norm.epsilon.ok_or_else(|| {
        format!(
            "the norm {} has an epsilon graft could not read; this adapter configuration applies \
             it a second time (original_ln_before with original_ln_after)",
            norm.node
        )
    })?;
    let (op, min_opset) = match norm.kind {
        NormKind::LayerNorm => ("LayerNormalization", 17),
        NormKind::RmsNorm => ("RMSNormalization", 23),
    };
    if graph.opset < min_opset {
        return Err(format!(
            "this adapter configuration applies the norm {} a second time, which needs ONNX's {op} \
             (opset {min_opset}); the model has opset {}",
            norm.node, graph.opset
        ));
    }
    let mut inputs = vec![value, norm.scale.as_str()];
    if let Some(shift) = &norm.shift {
        inputs.push(shift);
    }
    Ok(builder.op(
        &format!("{stem}.norm"),
        op,
        &inputs,
        &[
            ("axis", AttributeValue::Int(-1)),
            ("epsilon", AttributeValue::Float(epsilon)),
        ],
    ))
}

/// The message when no block gets an adapter.
fn no_block_message(graph: &GraphView, settings: &Settings) -> String {
    let n_layers: usize = graph.stacks.iter().map(|s| s.n_layers).sum();
    let n_blocks: usize = graph
        .stacks
        .iter()
        .flat_map(|s| &s.layers)
        .map(|l| l.blocks.len())
        .sum();
    if n_blocks == 0 {
        return format!(
            "graft found no residual blocks in this model ({n_layers} layers); `graft inspect` shows its structure"
        );
    }
    format!(
        "no block gets an adapter: {n_layers} layers, leave_out [{}], mh_adapter {}, output_adapter {}, cross_adapter {}",
        settings
            .leave_out
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        settings.mh_adapter,
        settings.output_adapter,
        settings.cross_adapter
    )
}

export_plugin!(Adapter);
