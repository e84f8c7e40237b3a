//! Layers and stacks along the residual stream. Each attention and FFN is a block that reads
//! the stream (directly or through a norm) and adds its result back onto it; a block follows
//! another when its skip operand is the other's sum (or that sum normalized). Chains of blocks
//! are stacks; a self-attention starts a layer. Norms join the block they feed (pre-norm) or
//! the block whose sum they normalize (post-norm).

use std::collections::{HashMap, HashSet, VecDeque};

use super::attention::AttentionCore;
use super::context::{Context, VIEW_OPS};
use super::ffn::Ffn;
use super::linear::{Linear, Linears};
use super::norm::Norm;
use super::{
    Attention, AttentionKind, BlockKind as ResidualKind, Layer, NormInfo, NormPlacement,
    ResidualBlock, Site, SiteKind, SplitPart, Stack, StackKind, WeightLayout,
};
use crate::analysis::labels::{initializer_label, node_label};

/// A stack with what later passes need to know about it.
pub(super) struct DetectedStack {
    pub stack: Stack,
    /// Linears (indices into [`Linears::all`]) that are sites of this stack.
    pub linears: Vec<usize>,
    /// Position of the stack's last residual sum.
    pub last_node: usize,
    /// The stream value the first block adds onto (the embeddings' output).
    first_skip: String,
    /// The last residual sum (view ops peeled off).
    last_sum: String,
    /// The attention cores of the stack (indices into the cores).
    cores: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum BlockKind {
    Attention { core: usize, cross: bool },
    Ffn(usize),
}

#[derive(Clone, Debug)]
struct Block {
    kind: BlockKind,
    /// The stream value the block's projections read (view ops peeled off).
    main_input: String,
    /// The stream value added back onto (view ops peeled off).
    skip: String,
    /// The residual `Add`'s operand that `skip` reaches it as.
    skip_operand: String,
    /// The residual `Add`'s other operand: the sublayer's result.
    branch: String,
    /// The residual sum.
    sum: String,
    sum_node: usize,
    first_node: usize,
}

pub(super) fn build_stacks(
    context: &Context,
    linears: &Linears,
    cores: &[AttentionCore],
    ffns: &[Ffn],
    norms: &[Norm],
) -> Vec<DetectedStack> {
    let mut blocks = Vec::new();
    for (core_index, core) in cores.iter().enumerate() {
        let Some(output) = core.output else { continue };
        let main_input = context.source_of(&linears.all[core.query].input);
        let cross = !core.fused() && context.source_of(&linears.all[core.key].input) != main_input;
        let first_node = [core.query, core.key, core.value]
            .iter()
            .map(|&l| linears.all[l].node)
            .min()
            .unwrap_or(usize::MAX);
        if let Some(block) = block_for(
            context,
            BlockKind::Attention {
                core: core_index,
                cross,
            },
            main_input,
            &linears.all[output],
            first_node,
        ) {
            blocks.push(block);
        }
    }
    for (ffn_index, ffn) in ffns.iter().enumerate() {
        let up = &linears.all[ffn.up];
        let first_node = ffn
            .gate
            .map_or(up.node, |gate| up.node.min(linears.all[gate].node));
        let main_input = context.source_of(&up.input);
        if let Some(block) = block_for(
            context,
            BlockKind::Ffn(ffn_index),
            main_input,
            &linears.all[ffn.down],
            first_node,
        ) {
            blocks.push(block);
        }
    }
    blocks.sort_by_key(|b| b.first_node);

    let successor = link_blocks(context, &blocks, norms);
    let has_predecessor: HashSet<usize> = successor.values().copied().collect();
    let mut detected = Vec::new();
    let mut used_norms = HashSet::new();
    for start in 0..blocks.len() {
        if has_predecessor.contains(&start) {
            continue;
        }
        let mut chain = vec![start];
        while let Some(&next) = successor.get(chain.last().unwrap_or(&start)) {
            if chain.contains(&next) {
                break;
            }
            chain.push(next);
        }
        let chain: Vec<&Block> = chain.iter().map(|&b| &blocks[b]).collect();
        let has_self_attention = chain
            .iter()
            .any(|b| matches!(b.kind, BlockKind::Attention { cross: false, .. }));
        if has_self_attention {
            let assembly = Assembly {
                context,
                linears,
                cores,
                ffns,
                norms,
            };
            detected.push(assembly.stack(&chain, &mut used_norms));
        }
    }
    name_stacks(context, linears, cores, norms, &mut detected);
    detected
}

fn block_for(
    context: &Context,
    kind: BlockKind,
    main_input: &str,
    last: &Linear,
    first_node: usize,
) -> Option<Block> {
    let found = residual_sum(context, &last.output)?;
    Some(Block {
        kind,
        main_input: main_input.to_owned(),
        branch: found.branch,
        skip: context.source_of(&found.skip).to_owned(),
        skip_operand: found.skip,
        sum: found.sum,
        sum_node: found.node,
        first_node,
    })
}

/// The `Add` of two computed values that `value` reaches through views and constant scaling.
struct ResidualSum {
    node: usize,
    /// The operand `value` reached.
    branch: String,
    /// The other operand.
    skip: String,
    sum: String,
}

/// The `Add` of two computed values that `value` reaches through views and constant scaling.
fn residual_sum(context: &Context, value: &str) -> Option<ResidualSum> {
    let mut current = value.to_owned();
    for _ in 0..8 {
        let consumers = context.consumers(&current);
        for &(position, slot) in consumers {
            let node = context.node(position);
            if !node.is("Add") {
                continue;
            }
            let other = node.input(if slot == 0 { 1 } else { 0 })?;
            if !context.is_constant(other) {
                return Some(ResidualSum {
                    node: position,
                    branch: current.clone(),
                    skip: other.to_owned(),
                    sum: node.outputs.first()?.clone(),
                });
            }
        }
        let [(position, slot)] = consumers else {
            return None;
        };
        let node = context.node(*position);
        let op = node.op_type.as_str();
        let scaling = matches!(op, "Mul" | "Div")
            && node
                .input(if *slot == 0 { 1 } else { 0 })
                .is_some_and(|other| context.is_constant(other));
        if !(scaling || VIEW_OPS.contains(&op) && *slot == 0) {
            return None;
        }
        current = node.outputs.first()?.clone();
    }
    None
}

/// For each block, the block that follows it on the residual stream.
fn link_blocks(context: &Context, blocks: &[Block], norms: &[Norm]) -> HashMap<usize, usize> {
    let normalized_from: HashMap<&str, Vec<&str>> =
        norms.iter().fold(HashMap::new(), |mut map, norm| {
            map.entry(context.source_of(&norm.input))
                .or_default()
                .push(context.source_of(&norm.output));
            map
        });
    let mut successor = HashMap::new();
    let mut claimed = HashSet::new();
    for (i, block) in blocks.iter().enumerate() {
        let sum = context.source_of(&block.sum);
        let mut continuations = vec![sum];
        continuations.extend(normalized_from.get(sum).into_iter().flatten().copied());
        let next = blocks.iter().enumerate().find(|(j, candidate)| {
            *j != i
                && !claimed.contains(j)
                && candidate.first_node > block.first_node
                && continuations.contains(&candidate.skip.as_str())
        });
        if let Some((j, _)) = next {
            successor.insert(i, j);
            claimed.insert(j);
        }
    }
    successor
}

/// What turning a chain of blocks into a [`Stack`] needs.
struct Assembly<'a, 'm> {
    context: &'a Context<'m>,
    linears: &'a Linears,
    cores: &'a [AttentionCore],
    ffns: &'a [Ffn],
    norms: &'a [Norm],
}

impl Assembly<'_, '_> {
    fn stack(&self, chain: &[&Block], used_norms: &mut HashSet<usize>) -> DetectedStack {
        let context = self.context;
        let mut layers: Vec<Vec<(usize, Site)>> = Vec::new();
        let mut flows: Vec<Layer> = Vec::new();
        let mut stack_linears = Vec::new();
        let mut post_norm_seen = false;
        let cross_attention = chain
            .iter()
            .any(|b| matches!(b.kind, BlockKind::Attention { cross: true, .. }));
        for (position, block) in chain.iter().enumerate() {
            let starts_layer = matches!(block.kind, BlockKind::Attention { cross: false, .. });
            if starts_layer || layers.is_empty() {
                layers.push(Vec::new());
                flows.push(Layer {
                    input: Some(block.skip.clone()),
                    ..Layer::default()
                });
            }
            let (Some(layer), Some(flow)) = (layers.last_mut(), flows.last_mut()) else {
                continue;
            };
            let pre_norm = self.norms.iter().position(|n| {
                context.source_of(&n.output) == block.main_input
                    && context.source_of(&n.input) == block.skip
            });
            let sum = context.source_of(&block.sum);
            let post_norm = self.norms.iter().position(|n| {
                let normalizes_sum = context.source_of(&n.input) == sum;
                let feeds_next = match chain.get(position + 1) {
                    Some(next) => context.source_of(&n.output) == next.skip,
                    None => post_norm_seen,
                };
                normalizes_sum && feeds_next
            });
            post_norm_seen |= post_norm.is_some();
            let block_sum = context.source_of(&block.sum).to_owned();
            flow.output = Some(match chain.get(position + 1) {
                Some(next) => next.skip.clone(),
                None => post_norm.map_or_else(
                    || block_sum.clone(),
                    |n| context.source_of(&self.norms[n].output).to_owned(),
                ),
            });
            if pre_norm.is_some() {
                flow.norm_placement = Some(NormPlacement::Pre);
            } else if post_norm.is_some() && flow.norm_placement.is_none() {
                flow.norm_placement = Some(NormPlacement::Post);
            }
            flow.blocks.push(ResidualBlock {
                kind: match block.kind {
                    BlockKind::Attention { cross: true, .. } => ResidualKind::CrossAttention,
                    BlockKind::Attention { .. } => ResidualKind::SelfAttention,
                    BlockKind::Ffn(_) => ResidualKind::Ffn,
                },
                input: block.main_input.clone(),
                branch: block.branch.clone(),
                skip: block.skip_operand.clone(),
                sum: block.sum.clone(),
                pre_norm: pre_norm.map(|n| norm_info(context, &self.norms[n])),
                post_norm: post_norm.map(|n| norm_info(context, &self.norms[n])),
            });
            match block.kind {
                BlockKind::Attention { core, cross } => {
                    let core = &self.cores[core];
                    if !cross {
                        flow.attention_sum = Some(block_sum.clone());
                    }
                    flow.attention.push(Attention {
                        kind: if cross {
                            AttentionKind::Cross
                        } else {
                            AttentionKind::SelfAttention
                        },
                        causal: core.causal || (!cross && cross_attention),
                        mask: core.mask.clone(),
                        scores: core.scores.clone(),
                        probabilities: core.probabilities.clone(),
                        key_states: core.key_states.clone(),
                        value_states: core.value_states.clone(),
                        sum: Some(block_sum),
                    });
                }
                BlockKind::Ffn(_) => flow.ffn_sum = Some(block_sum),
            }
            for norm in [pre_norm, post_norm].into_iter().flatten() {
                if used_norms.insert(norm) {
                    let site = norm_site(context, &self.norms[norm]);
                    layer.push((self.norms[norm].node, site));
                }
            }
            for block_site in self.block_sites(block) {
                let linear = &self.linears.all[block_site.linear];
                stack_linears.push(block_site.linear);
                let mut site = linear_site(context, linear, block_site.kind);
                site.attention = block_site.attention;
                site.key_states = block_site.key_states;
                site.value_states = block_site.value_states;
                site.split = block_site.split;
                layer.push((linear.node, site));
            }
        }
        let layers: Vec<Layer> = layers
            .into_iter()
            .zip(flows)
            .enumerate()
            .map(|(index, (mut sites, flow))| {
                sites.sort_by_key(|(node, _)| *node);
                Layer {
                    index,
                    sites: sites.into_iter().map(|(_, site)| site).collect(),
                    ..flow
                }
            })
            .collect();
        let stack_cores = chain
            .iter()
            .filter_map(|b| match b.kind {
                BlockKind::Attention { core, .. } => Some(core),
                BlockKind::Ffn(_) => None,
            })
            .collect();
        let first_attention = chain.iter().find_map(|b| match b.kind {
            BlockKind::Attention { core, cross: false } => Some(&self.cores[core]),
            _ => None,
        });
        let (hidden_size, n_heads, n_kv_heads, head_dim) = match first_attention {
            Some(core) => {
                let n_heads = core.n_heads.unwrap_or(0);
                (
                    self.linears.all[core.query].in_features,
                    n_heads,
                    core.n_kv_heads.unwrap_or(n_heads),
                    core.head_dim,
                )
            }
            None => (0, 0, 0, None),
        };
        let causal = layers
            .iter()
            .flat_map(|l| &l.attention)
            .any(|a| a.kind == AttentionKind::SelfAttention && a.causal);
        let last_sum = chain
            .last()
            .map(|b| context.source_of(&b.sum).to_owned())
            .unwrap_or_default();
        let output = self
            .norms
            .iter()
            .find(|n| context.source_of(&n.input) == last_sum)
            .map_or_else(
                || last_sum.clone(),
                |n| context.source_of(&n.output).to_owned(),
            );
        DetectedStack {
            stack: Stack {
                name: String::new(),
                n_layers: layers.len(),
                hidden_size,
                n_heads,
                n_kv_heads,
                head_dim,
                layers,
                kind: causal.then_some(StackKind::Decoder),
                cross_attention,
                input: chain.first().map(|b| b.skip.clone()),
                output: Some(output),
            },
            linears: stack_linears,
            last_node: chain.iter().map(|b| b.sum_node).max().unwrap_or(0),
            first_skip: chain.first().map(|b| b.skip.clone()).unwrap_or_default(),
            last_sum,
            cores: stack_cores,
        }
    }

    /// The linear sites of a block, in the order q, k, v (or qkv), o / gate, up (or gate_up),
    /// down.
    fn block_sites(&self, block: &Block) -> Vec<BlockSite> {
        let site = |linear, kind, attention| BlockSite {
            linear,
            kind,
            attention,
            key_states: None,
            value_states: None,
            split: Vec::new(),
        };
        match block.kind {
            BlockKind::Attention { core, cross } => {
                let core = &self.cores[core];
                let attention = Some(if cross {
                    AttentionKind::Cross
                } else {
                    AttentionKind::SelfAttention
                });
                let mut sites = Vec::new();
                if core.fused() {
                    sites.push(BlockSite {
                        key_states: core.key_states.clone(),
                        value_states: core.value_states.clone(),
                        split: core.qkv_split.clone(),
                        ..site(core.query, SiteKind::Qkv, attention)
                    });
                } else {
                    sites.push(site(core.query, SiteKind::Q, attention));
                    let mut key = BlockSite {
                        key_states: core.key_states.clone(),
                        ..site(core.key, SiteKind::K, attention)
                    };
                    if core.value == core.key {
                        key.value_states.clone_from(&core.value_states);
                        sites.push(key);
                    } else {
                        sites.push(key);
                        sites.push(BlockSite {
                            value_states: core.value_states.clone(),
                            ..site(core.value, SiteKind::V, attention)
                        });
                    }
                }
                sites.extend(core.output.map(|o| site(o, SiteKind::O, attention)));
                sites
            }
            BlockKind::Ffn(ffn) => {
                let ffn = &self.ffns[ffn];
                let mut sites = Vec::new();
                match &ffn.fused_halves {
                    Some(halves) => {
                        let mut parts = [
                            (halves.gate.start, SiteKind::FfnGate, halves.gate.len()),
                            (halves.up.start, SiteKind::FfnUp, halves.up.len()),
                        ];
                        parts.sort_by_key(|&(start, _, _)| start);
                        sites.push(BlockSite {
                            split: parts
                                .iter()
                                .map(|&(_, kind, width)| SplitPart { kind, width })
                                .collect(),
                            ..site(ffn.up, SiteKind::FfnGateUp, None)
                        });
                    }
                    None => {
                        sites.extend(ffn.gate.map(|gate| site(gate, SiteKind::FfnGate, None)));
                        sites.push(site(ffn.up, SiteKind::FfnUp, None));
                    }
                }
                sites.push(site(ffn.down, SiteKind::FfnDown, None));
                sites
            }
        }
    }
}

/// A linear's role in a block, before it becomes a [`Site`].
struct BlockSite {
    linear: usize,
    kind: SiteKind,
    attention: Option<AttentionKind>,
    key_states: Option<String>,
    value_states: Option<String>,
    split: Vec<SplitPart>,
}

/// The label of a linear: its node's, its bias `Add`'s, or its parameters' module path.
pub(super) fn linear_label(context: &Context, linear: &Linear) -> Option<String> {
    node_label(context.node(linear.node))
        .or_else(|| linear.bias_node.and_then(|b| node_label(context.node(b))))
        .or_else(|| initializer_label(&linear.weight))
        .or_else(|| linear.bias.as_deref().and_then(initializer_label))
}

fn linear_site(context: &Context, linear: &Linear, kind: SiteKind) -> Site {
    Site {
        kind,
        attention: None,
        node: context.node(linear.node).name.clone(),
        weight: linear.weight.clone(),
        label: linear_label(context, linear),
        in_features: linear.in_features,
        out_features: linear.out_features,
        layout: linear.layout,
        bias: linear.bias.clone(),
        input: linear.input.clone(),
        output: linear.output.clone(),
        key_states: None,
        value_states: None,
        split: Vec::new(),
    }
}

fn norm_info(context: &Context, norm: &Norm) -> NormInfo {
    NormInfo {
        node: context.node(norm.node).name.clone(),
        kind: norm.kind,
        scale: norm.scale.clone(),
        shift: norm.shift.clone(),
        epsilon: norm.epsilon,
        input: norm.input.clone(),
        output: norm.output.clone(),
    }
}

fn norm_site(context: &Context, norm: &Norm) -> Site {
    let node = context.node(norm.node);
    Site {
        kind: SiteKind::Norm,
        attention: None,
        node: node.name.clone(),
        weight: norm.scale.clone(),
        label: node_label(node).or_else(|| initializer_label(&norm.scale)),
        in_features: norm.width,
        out_features: norm.width,
        layout: WeightLayout::InOut,
        bias: norm.shift.clone(),
        input: norm.input.clone(),
        output: norm.output.clone(),
        key_states: None,
        value_states: None,
        split: Vec::new(),
    }
}

/// What feeds a stack's stream: a patch convolution, a token lookup (with its vocabulary).
#[derive(Default)]
struct Feed {
    patches: bool,
    token_vocabulary: Option<usize>,
}

fn feed_of(context: &Context, linears: &Linears, stream: &str) -> Feed {
    let mut feed = Feed::default();
    let mut queue = VecDeque::from([stream.to_owned()]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 256 || !visited.insert(current.clone()) {
            continue;
        }
        if linears.producing(&current).is_some() {
            continue;
        }
        let Some((position, node)) = context.producer(&current) else {
            continue;
        };
        if node.is("Conv")
            && node
                .input(1)
                .is_some_and(|w| context.float_initializer(w).is_some())
        {
            feed.patches = true;
            continue;
        }
        if node.is("Gather") {
            let table = node.input(0).and_then(|t| context.float_initializer(t));
            let ids = node.input(1).map(|i| context.source_of(i));
            if let (Some(table), Some(ids)) = (table, ids) {
                if table.dims.len() == 2 && context.is_graph_input(ids) {
                    let vocabulary = usize::try_from(table.dims[0]).unwrap_or(0);
                    feed.token_vocabulary = feed.token_vocabulary.max(Some(vocabulary));
                }
                continue;
            }
        }
        if matches!(
            node.op_type.as_str(),
            "MatMul" | "Softmax" | "Shape" | "Size"
        ) {
            continue;
        }
        queue.extend(context.dynamic_inputs(position).map(str::to_owned));
    }
    feed
}

/// Names the stacks (`decoder` for cross-attending ones and `encoder` for what they attend to;
/// `vision` and `text` for a patch-fed and a token-fed stack side by side; otherwise `decoder`
/// when causal, else `encoder`) and orders them encoder-like first.
fn name_stacks(
    context: &Context,
    linears: &Linears,
    cores: &[AttentionCore],
    norms: &[Norm],
    detected: &mut [DetectedStack],
) {
    let mut names: Vec<Option<&str>> = vec![None; detected.len()];
    for stack_index in 0..detected.len() {
        let cross_keys: Vec<String> = detected[stack_index]
            .stack
            .layers
            .iter()
            .flat_map(|l| &l.sites)
            .filter(|site| site.attention == Some(AttentionKind::Cross) && site.kind == SiteKind::K)
            .map(|site| site.input.clone())
            .collect();
        if cross_keys.is_empty() {
            continue;
        }
        names[stack_index] = Some("decoder");
        for key_input in &cross_keys {
            let stream = attended_stream(context, norms, key_input);
            let attended = detected.iter().position(|d| d.last_sum == stream);
            if let Some(attended) = attended.filter(|&a| a != stack_index && names[a].is_none()) {
                names[attended] = Some("encoder");
            }
        }
    }
    let feeds: Vec<Feed> = detected
        .iter()
        .map(|d| feed_of(context, linears, &d.first_skip))
        .collect();
    let any_patches = feeds.iter().any(|f| f.patches);
    let any_tokens = feeds.iter().any(|f| f.token_vocabulary.is_some());
    let assigned: HashSet<usize> = detected
        .iter()
        .flat_map(|d| d.linears.iter().copied())
        .collect();
    for stack_index in 0..detected.len() {
        if names[stack_index].is_some() {
            continue;
        }
        let feed = &feeds[stack_index];
        names[stack_index] = Some(if feed.patches && any_tokens {
            "vision"
        } else if feed.token_vocabulary.is_some() && any_patches {
            "text"
        } else {
            let stack_cores = || detected[stack_index].cores.iter().map(|&c| &cores[c]);
            let causal = stack_cores().any(|c| c.causal);
            let unmasked = stack_cores().all(|c| !c.masked);
            let language_head = feed.token_vocabulary.is_some_and(|vocabulary| {
                linears
                    .all
                    .iter()
                    .enumerate()
                    .any(|(i, l)| !assigned.contains(&i) && l.out_features == vocabulary)
            });
            if causal || (unmasked && language_head) {
                "decoder"
            } else {
                "encoder"
            }
        });
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (stack_index, name) in names.iter().enumerate() {
        let base = name.unwrap_or("encoder");
        let stack = &mut detected[stack_index].stack;
        if stack.kind.is_none() && base != "decoder" {
            stack.kind = Some(StackKind::Encoder);
        }
        let count = seen.entry(base).or_insert(0);
        detected[stack_index].stack.name = if *count == 0 {
            base.to_owned()
        } else {
            format!("{base}_{count}")
        };
        *count += 1;
    }
    let rank = |name: &str| match name.split('_').next().unwrap_or("") {
        "encoder" => 0,
        "text" => 1,
        "vision" => 2,
        "decoder" => 3,
        _ => 4,
    };
    detected.sort_by_key(|d| (rank(&d.stack.name), d.last_node));
}

/// The residual stream a cross-attention key projection reading `key_input` attends to: its
/// input, or the input of the norm producing it.
fn attended_stream(context: &Context, norms: &[Norm], key_input: &str) -> String {
    let stream = context.source_of(key_input);
    norms
        .iter()
        .find(|n| context.source_of(&n.output) == stream)
        .map_or(stream, |n| context.source_of(&n.input))
        .to_owned()
}
