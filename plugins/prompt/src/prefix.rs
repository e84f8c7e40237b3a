//! `prefix_tuning`: learned keys and values before every layer's attention (Li & Liang, 2021,
//! "Prefix-Tuning: Optimizing Continuous Prompts for Generation"), as HF PEFT's
//! `PrefixTuningConfig` does, written as PEFT's `PREFIX_TUNING` adapter files.
//!
//! PEFT feeds the prefix to the model as its key/value cache, so this method works on models
//! exported with a cache (`past_key_values` inputs): each layer's cache input is read as
//! `Concat(prefix, past)`, which every reader sees — the attention, and the nodes that take
//! the cache length for position ids and causal masks, exactly as when the model is given a
//! longer cache; the attention mask gets ones in front. The `present` outputs drop the prefix
//! again, so that a generation loop feeds them back as usual and each step prepends it anew.
//!
//! The prefix is one table `[n, layers · 2 · kv_heads · head_dim]` in PEFT's layout: along the
//! last axis, block `2i` is layer `i`'s keys and block `2i + 1` its values, each `[kv_heads,
//! head_dim]` row-major (PEFT's `view(n, 2L, heads, head_dim)` before it permutes to the
//! cache's `[heads, n, head_dim]`).

use graft_plugin_sdk::{
    AttributeValue, ConfigKey, Fold, GraphInput, GraphView, Init, InputRole, MethodConfig,
    MethodDescription, PatchBuilder, PatchReply, PeftFiles, PeftTensor, Stack,
};
use serde_json::json;

/// The method's description and settings.
pub fn description() -> MethodDescription {
    MethodDescription::new(
        "prefix_tuning",
        "learned keys and values before every layer's key/value cache (HF PEFT's PREFIX_TUNING); \
         needs a model exported with a cache",
        vec![
            ConfigKey::int("num_virtual_tokens", 20, "length of the prefix"),
            ConfigKey::float(
                "init_std",
                1.0,
                "standard deviation of the prefix's random init (PEFT's nn.Embedding: 1)",
            ),
            ConfigKey::int("seed", 0, "seed of the random init"),
            ConfigKey::bool(
                "prefix_projection",
                false,
                "reparameterize the prefix as PEFT's MLP (embedding → Linear → Tanh → Linear, \
                 as in the prefix-tuning paper); graft merge and the PEFT export store the \
                 table it computes",
            ),
            ConfigKey::int(
                "encoder_hidden_size",
                512,
                "width of the MLP's hidden layer (with prefix_projection)",
            ),
        ],
    )
}

/// One layer's cache inputs and the outputs that return them.
struct LayerCache<'g> {
    key: &'g GraphInput,
    value: &'g GraphInput,
}

/// The patch of `prefix_tuning` with `config` on `graph`.
pub fn patch(config: &MethodConfig, graph: &GraphView) -> Result<PatchReply, String> {
    let n = config.get_usize("num_virtual_tokens")?;
    let (stack, caches) = layer_caches(graph)?;
    let kv_width = stack.n_kv_heads * stack.head_dim();
    let n_layers = caches.len();
    let mut builder =
        PatchBuilder::new(graph, "prefix_tuning").with_seed(config.get_i64("seed")? as u64);
    if n == 0 {
        return Ok(builder.finish());
    }
    let dtype = builder.value_dtype(&caches[0].key.name)?;
    let init = Init::Normal {
        mean: 0.0,
        std: config.get_f64("init_std")?,
        seed: builder.next_seed(),
    };
    let width = n_layers * 2 * kv_width;
    let table = if config.get_bool("prefix_projection")? {
        let hidden = config.get_usize("encoder_hidden_size")?;
        let input = builder.parameter(
            "prefix_tuning.prefix.embedding",
            dtype,
            vec![n, kv_width],
            init,
            true,
        );
        let (table, nodes) = builder.block(|b| {
            crate::mlp::mlp(
                b,
                "prefix_tuning.transform",
                &input,
                dtype,
                &[kv_width, hidden, width],
                "Tanh",
            )
        })?;
        builder.fold(Fold::Bake {
            value: table.clone(),
            nodes,
            storage: None,
        });
        table
    } else {
        builder.parameter("prefix_tuning.prefix", dtype, vec![n, width], init, true)
    };
    for (layer, cache) in caches.iter().enumerate() {
        for (side, input) in [(0, cache.key), (1, cache.value)] {
            let block = 2 * layer + side;
            prepend_block(&mut builder, &table, input, block, n, stack)?;
        }
    }
    if let Some(mask) = graph.inputs_with_role(InputRole::AttentionMask).next() {
        builder.extend_mask(&mask.name, n)?;
    }
    let mut reply = builder.finish();
    reply.patch.training.peft = Some(PeftFiles {
        config: json!({
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": n,
            // PEFT sizes the prefix by the key/value heads (grouped-query models included).
            "token_dim": kv_width,
            "num_layers": n_layers,
            "num_attention_heads": stack.n_kv_heads,
            "num_transformer_submodules": 1,
            // The file holds the table (with prefix_projection, the MLP's output, baked), which
            // is PEFT's inference form.
            "prefix_projection": false,
            "encoder_hidden_size": stack.hidden_size,
            "inference_mode": true,
            "base_model_name_or_path": null,
            "revision": null,
            "auto_mapping": null,
        }),
        tensors: vec![PeftTensor {
            key: "prompt_embeddings".into(),
            tensor: table,
            transpose: false,
            shape: vec![n, width],
            rank_axis: None,
        }],
        bare_keys: true,
    });
    Ok(reply)
}

/// The decoder stack and, for each of its layers in order, its key and value cache inputs;
/// refused, naming what is missing, for models exported without a cache.
fn layer_caches(graph: &GraphView) -> Result<(&Stack, Vec<LayerCache<'_>>), String> {
    let cache_of = |role: InputRole, stack: &str, layer: usize| {
        graph
            .inputs_with_role(role)
            .find(|i| i.stack.as_deref() == Some(stack) && i.layer == Some(layer))
    };
    let stack = graph
        .stacks
        .iter()
        .find(|s| cache_of(InputRole::PastKey, &s.name, 0).is_some())
        .ok_or_else(|| {
            "prefix tuning feeds the prefix as every layer's key/value cache, and this model has \
             no cache inputs (see graft inspect): export it with its cache (past_key_values \
             inputs, e.g. `use_cache=True`), which carries the position offsets and causal masks \
             a prefix needs"
                .to_owned()
        })?;
    let caches = (0..stack.n_layers)
        .map(|layer| {
            let key = cache_of(InputRole::PastKey, &stack.name, layer);
            let value = cache_of(InputRole::PastValue, &stack.name, layer);
            match (key, value) {
                (Some(key), Some(value)) => Ok(LayerCache { key, value }),
                _ => Err(format!(
                    "layer {layer} of stack {} has no key and value cache inputs; prefix tuning \
                     needs them on every layer",
                    stack.name
                )),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((stack, caches))
}

/// Makes every reader of the cache `input` `[batch, kv_heads, past, head_dim]` read
/// `Concat(P, input, axis = 2)`, `P` being block `block` of the prefix `table` `[n, 2L · W]`
/// as `[batch, kv_heads, n, head_dim]`, and its `present` output drop the first `n`
/// positions again.
fn prepend_block(
    builder: &mut PatchBuilder<'_>,
    table: &str,
    input: &GraphInput,
    block: usize,
    n: usize,
    stack: &Stack,
) -> Result<(), String> {
    let (heads, head_dim) = (stack.n_kv_heads, stack.head_dim());
    let width = (heads * head_dim) as i64;
    let axis = |axis: i64| [("axis", AttributeValue::Int(axis))];
    let past = builder.current(&input.name);
    let stem = builder.stem(&format!("prefix_tuning.{}", input.name));
    let start = builder.constant_ints(&format!("{stem}.start"), &[block as i64 * width]);
    let end = builder.constant_ints(&format!("{stem}.end"), &[(block as i64 + 1) * width]);
    let last = builder.constant_ints(&format!("{stem}.last_axis"), &[1]);
    let rows = builder.op(
        &format!("{stem}.rows"),
        "Slice",
        &[table, &start, &end, &last],
        &[],
    );
    let shape = builder.constant_ints(
        &format!("{stem}.heads"),
        &[n as i64, heads as i64, head_dim as i64],
    );
    let split = builder.op(&format!("{stem}.split"), "Reshape", &[&rows, &shape], &[]);
    let per_head = builder.op(
        &format!("{stem}.per_head"),
        "Transpose",
        &[&split],
        &[("perm", AttributeValue::Ints(vec![1, 0, 2]))],
    );
    let zero = builder.constant_ints(&format!("{stem}.zero"), &[0]);
    let one = builder.op(
        &format!("{stem}.one"),
        "Unsqueeze",
        &[&per_head, &zero],
        &[],
    );
    let cache_shape = builder.op(&format!("{stem}.cache_shape"), "Shape", &[&past], &[]);
    let batch = builder.op(
        &format!("{stem}.batch"),
        "Gather",
        &[&cache_shape, &zero],
        &axis(0),
    );
    let tail = builder.constant_ints(
        &format!("{stem}.tail"),
        &[heads as i64, n as i64, head_dim as i64],
    );
    let target = builder.op(
        &format!("{stem}.target"),
        "Concat",
        &[&batch, &tail],
        &axis(0),
    );
    let prefix = builder.op(&format!("{stem}.expand"), "Expand", &[&one, &target], &[]);
    let longer = builder.op(
        &format!("{stem}.concat"),
        "Concat",
        &[&prefix, &past],
        &axis(2),
    );
    builder.rewire(&past, &longer);
    if let Some(present) = &input.present {
        let from = builder.constant_ints(&format!("{stem}.present_start"), &[n as i64]);
        let to = builder.constant_ints(&format!("{stem}.present_end"), &[i64::MAX]);
        let seq = builder.constant_ints(&format!("{stem}.present_axis"), &[2]);
        let kept = builder.op(
            &format!("{stem}.present"),
            "Slice",
            &[present, &from, &to, &seq],
            &[],
        );
        builder.rewire_graph_output(present, &kept);
    }
    Ok(())
}
