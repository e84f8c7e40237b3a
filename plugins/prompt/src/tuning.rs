//! `prompt_tuning`: learned virtual-token embeddings put before the token embeddings
//! (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"), as HF
//! PEFT's `PromptTuningConfig` does, written as PEFT's `PROMPT_TUNING` adapter files; and
//! `p_tuning` (Liu et al., 2021, "GPT Understands, Too"), whose virtual tokens PEFT's MLP
//! prompt encoder computes from learned embeddings, under a bake fold, written as PEFT's
//! `P_TUNING` files (which hold the computed tokens).
//!
//! The graph edit follows what PEFT feeds the model: the token ids are lengthened by the
//! number of virtual tokens (repeating each sequence's first id, so that everything the graph
//! derives from them — position ids, causal masks, reshape targets — sees the longer
//! sequence), the token embedding's first positions are replaced by the prompt, the attention
//! mask gets ones in front, token type ids zeros, and position ids given as an input become
//! `0 … n−1` followed by the given ones shifted by `n` (PEFT ignores given position ids and
//! lets the model count `0 … n+S−1`; the two agree on unpadded inputs).

use graft_plugin_sdk::{
    ConfigKey, DType, Fold, GraphView, Init, InputRole, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, PeftFiles, PeftTensor, SequenceFill, StackKind, WeightLayout,
};
use serde_json::json;

/// The inits `init` accepts.
const INITS: &str = "random, sample_vocab, tokens";

/// The settings `prompt_tuning` and `p_tuning` share.
fn shared_keys() -> Vec<ConfigKey> {
    vec![
        ConfigKey::int(
            "num_virtual_tokens",
            20,
            "number of virtual tokens; the model's outputs gain as many leading positions",
        ),
        ConfigKey::string(
            "init",
            "random",
            "random: N(0, init_std²) as PEFT's RANDOM; sample_vocab: rows of the \
                     vocabulary drawn with `seed`; tokens: the embeddings of init_tokens, \
                     repeated or cut to num_virtual_tokens as PEFT's TEXT init does",
        ),
        ConfigKey::new(
            "init_tokens",
            graft_plugin_sdk::ConfigKind::List,
            "".into(),
            "token ids for init=tokens (a tokenized text such as \"Classify the \
                     sentiment:\")",
        ),
        ConfigKey::float("init_std", 1.0, "standard deviation of the random init"),
        ConfigKey::int("seed", 0, "seed of the random and sample_vocab inits"),
        ConfigKey::bool(
            "train_head",
            true,
            "for SEQ_CLS and TOKEN_CLS, also train the classification head (the head \
                     whose output is the model's output), as PEFT does through modules_to_save",
        ),
        ConfigKey::string(
            "task_type",
            "auto",
            "PEFT task_type written in adapter_config.json: SEQ_CLS, TOKEN_CLS, \
                     CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION; auto: CAUSAL_LM for a decoder, \
                     SEQ_CLS for an encoder with one output per sequence, TOKEN_CLS with one per \
                     token",
        ),
    ]
}

/// `prompt_tuning`'s description and settings.
pub fn description() -> MethodDescription {
    MethodDescription::new(
        "prompt_tuning",
        "learned virtual tokens before the input's token embeddings (HF PEFT's PROMPT_TUNING)",
        shared_keys(),
    )
}

/// `p_tuning`'s description and settings: those of `prompt_tuning` and the prompt encoder's.
pub fn p_tuning_description() -> MethodDescription {
    let mut keys = shared_keys();
    keys.push(ConfigKey::int(
        "encoder_hidden_size",
        0,
        "width of the prompt encoder's hidden layers; 0: the model's hidden size",
    ));
    keys.push(ConfigKey::string(
        "encoder_reparameterization_type",
        "MLP",
        "the prompt encoder: MLP (PEFT's three Linear layers with ReLUs between them)",
    ));
    MethodDescription::new(
        "p_tuning",
        "virtual tokens computed by a trained prompt encoder (an MLP) from learned embeddings, \
         baked into a table by graft merge (HF PEFT's P_TUNING)",
        keys,
    )
}

/// The patch of `method` (`prompt_tuning` or `p_tuning`) with `config` on `graph`.
pub fn patch(config: &MethodConfig, graph: &GraphView, method: &str) -> Result<PatchReply, String> {
    let n = config.get_usize("num_virtual_tokens")?;
    let token_ids = graph
        .inputs_with_role(InputRole::TokenIds)
        .next()
        .ok_or_else(|| {
            "prompt tuning puts virtual tokens before the token embedding of the input ids, \
                 and this model has no token-id input (see graft inspect)"
                .to_owned()
        })?
        .name
        .clone();
    if graph.inputs_with_role(InputRole::PastKey).next().is_some() {
        return Err(
            "prompt tuning on a model with a key/value cache input is not supported: \
                        the prompt belongs to the first step only; use the model exported \
                        without a cache"
                .to_owned(),
        );
    }
    let embedding = graph
        .embeddings
        .iter()
        .find(|e| e.kind == graft_plugin_sdk::EmbeddingKind::Token)
        .ok_or_else(|| "the model has no token embedding (see graft inspect)".to_owned())?;
    let encoded = method == "p_tuning";
    let mut builder = PatchBuilder::new(graph, method).with_seed(config.get_i64("seed")? as u64);
    let init = prompt_init(config, &mut builder, embedding, n)?;
    builder.extend_sequence_input(&token_ids, n, SequenceFill::CopyFirst)?;
    let mask = graph
        .inputs_with_role(InputRole::AttentionMask)
        .next()
        .map(|i| i.name.clone());
    let mut encoder_width = 0;
    let prompt = if encoded && n > 0 {
        encoder_width = match config.get_usize("encoder_hidden_size")? {
            0 => embedding.dim,
            width => width,
        };
        let kind = config.get_string("encoder_reparameterization_type")?;
        if kind != "MLP" {
            return Err(format!(
                "encoder_reparameterization_type: \"{kind}\" is not supported; graft builds \
                 PEFT's MLP prompt encoder (MLP)"
            ));
        }
        let dtype = builder.value_dtype(&embedding.output)?;
        let input = builder.parameter(
            "p_tuning.prompt.embedding",
            dtype,
            vec![n, embedding.dim],
            init,
            true,
        );
        let (encoded, nodes) = builder.block(|b| {
            let widths = [embedding.dim, encoder_width, encoder_width, embedding.dim];
            crate::mlp::mlp(b, "p_tuning.encoder", &input, dtype, &widths, "Relu")
        })?;
        builder.fold(Fold::Bake {
            value: encoded.clone(),
            nodes,
            storage: None,
        });
        builder.prepend_value_to_sequence(&embedding.output, mask.as_deref(), &encoded, n, true)?
    } else {
        builder.prepend_to_sequence(
            &embedding.output,
            mask.as_deref(),
            n,
            embedding.dim,
            init,
            true,
        )?
    };
    if let Some(token_types) = graph.inputs_with_role(InputRole::TokenTypeIds).next() {
        builder.extend_sequence_input(&token_types.name, n, SequenceFill::Value(0))?;
    }
    if let Some(positions) = graph.inputs_with_role(InputRole::PositionIds).next() {
        shift_positions(&mut builder, &positions.name, n)?;
    }
    let task_type = task_type(config, graph)?;
    let mut head_tensors = Vec::new();
    if config.get_bool("train_head")? && matches!(task_type.as_str(), "SEQ_CLS" | "TOKEN_CLS") {
        head_tensors = train_head(&mut builder, graph)?;
    }
    let mut reply = builder.finish();
    if let Some(prompt) = prompt.prompt {
        let mut tensors = vec![PeftTensor {
            key: "prompt_embeddings".into(),
            tensor: prompt,
            transpose: false,
            shape: vec![n, embedding.dim],
            rank_axis: None,
        }];
        tensors.extend(head_tensors);
        reply.patch.training.peft = Some(PeftFiles {
            config: peft_config(config, graph, &task_type, n, embedding.dim, encoder_width)?,
            tensors,
            bare_keys: true,
        });
    }
    Ok(reply)
}

/// The init of the prompt `[n, dim]` that `config` asks for.
fn prompt_init(
    config: &MethodConfig,
    builder: &mut PatchBuilder<'_>,
    embedding: &graft_plugin_sdk::Embedding,
    n: usize,
) -> Result<Init, String> {
    let vocabulary = embedding.n_embeddings as u64;
    let rows = |rows: Vec<u64>| Init::Rows {
        table: embedding.weight.clone(),
        rows,
    };
    match config.get_string("init")?.as_str() {
        "random" => Ok(Init::Normal {
            mean: 0.0,
            std: config.get_f64("init_std")?,
            seed: builder.next_seed(),
        }),
        "sample_vocab" if vocabulary > 0 => Ok(rows(
            (0..n).map(|_| builder.next_seed() % vocabulary).collect(),
        )),
        "sample_vocab" => Err("init=sample_vocab: the vocabulary size is unknown".to_owned()),
        "tokens" => {
            let ids = config
                .get_list("init_tokens")?
                .iter()
                .map(|t| {
                    t.parse::<u64>()
                        .ok()
                        .filter(|&id| id < vocabulary)
                        .ok_or_else(|| {
                            format!(
                                "init_tokens: {t:?} is not a token id below the vocabulary \
                                 size {vocabulary}"
                            )
                        })
                })
                .collect::<Result<Vec<u64>, String>>()?;
            if ids.is_empty() {
                return Err("init=tokens needs init_tokens (token ids, e.g. 101,2023,2003)".into());
            }
            Ok(rows(ids.iter().copied().cycle().take(n).collect()))
        }
        other => Err(format!("init: \"{other}\" is not one of: {INITS}")),
    }
}

/// Makes every reader of the position ids `positions` `[batch, seq]` read
/// `Concat(0 … n−1, positions + n)`: the virtual tokens take the first positions.
fn shift_positions(
    builder: &mut PatchBuilder<'_>,
    positions: &str,
    n: usize,
) -> Result<(), String> {
    if n == 0 {
        return Ok(());
    }
    if builder.graph().dtype_of(positions) != Some(DType::Int64) {
        return Err(format!(
            "position ids {positions:?} are not int64; graft shifts int64 position ids only"
        ));
    }
    let p = builder.current(positions);
    let stem = builder.stem("prompt_tuning.positions");
    let offset = builder.constant_ints(&format!("{stem}.offset"), &[n as i64]);
    let shifted = builder.op(&format!("{stem}.shift"), "Add", &[&p, &offset], &[]);
    let first = builder.constant_ints(&format!("{stem}.first"), &(0..n as i64).collect::<Vec<_>>());
    let shape = builder.op(&format!("{stem}.shape"), "Shape", &[&p], &[]);
    let zero = builder.constant_ints(&format!("{stem}.batch_index"), &[0]);
    let batch = builder.op(
        &format!("{stem}.batch"),
        "Gather",
        &[&shape, &zero],
        &[("axis", graft_plugin_sdk::AttributeValue::Int(0))],
    );
    let width = builder.constant_ints(&format!("{stem}.width"), &[n as i64]);
    let target = builder.op(
        &format!("{stem}.target"),
        "Concat",
        &[&batch, &width],
        &[("axis", graft_plugin_sdk::AttributeValue::Int(0))],
    );
    let leading = builder.op(
        &format!("{stem}.leading"),
        "Expand",
        &[&first, &target],
        &[],
    );
    let output = builder.op(
        &format!("{stem}.concat"),
        "Concat",
        &[&leading, &shifted],
        &[("axis", graft_plugin_sdk::AttributeValue::Int(1))],
    );
    builder.rewire(&p, &output);
    Ok(())
}

/// Marks the classification head (the head whose output is the model's first output, else
/// the last head) trainable, and returns its tensors in PEFT's files: `base_model.<label>.weight`
/// `[out, in]` and `.bias`.
fn train_head(
    builder: &mut PatchBuilder<'_>,
    graph: &GraphView,
) -> Result<Vec<PeftTensor>, String> {
    let head = graph
        .heads
        .iter()
        .find(|h| graph.outputs.first() == Some(&h.output))
        .or(graph.heads.last())
        .ok_or_else(|| {
            "train_head: the model has no classification head (see graft inspect); set \
             train_head=false"
                .to_owned()
        })?;
    let label = head.label.as_deref().unwrap_or(&head.weight);
    builder.mark_trainable(&head.weight)?;
    let mut tensors = vec![PeftTensor {
        key: format!("base_model.{label}.weight"),
        tensor: head.weight.clone(),
        transpose: head.layout == WeightLayout::InOut,
        shape: vec![head.out_features, head.in_features],
        rank_axis: None,
    }];
    if let Some(bias) = &head.bias {
        builder.mark_trainable(bias)?;
        tensors.push(PeftTensor {
            key: format!("base_model.{label}.bias"),
            tensor: bias.clone(),
            transpose: false,
            shape: vec![head.out_features],
            rank_axis: None,
        });
    }
    Ok(tensors)
}

/// The PEFT task type `config` names, or the one [`auto_task_type`] finds.
fn task_type(config: &MethodConfig, graph: &GraphView) -> Result<String, String> {
    match config.get_string("task_type")?.as_str() {
        "auto" => Ok(auto_task_type(graph)),
        given @ ("SEQ_CLS" | "TOKEN_CLS" | "CAUSAL_LM" | "SEQ_2_SEQ_LM" | "FEATURE_EXTRACTION"
        | "QUESTION_ANS") => Ok(given.to_owned()),
        other => Err(format!(
            "task_type: \"{other}\" is not one of: auto, SEQ_CLS, TOKEN_CLS, CAUSAL_LM, \
             SEQ_2_SEQ_LM, FEATURE_EXTRACTION, QUESTION_ANS"
        )),
    }
}

/// PEFT's `adapter_config.json` for this prompt.
fn peft_config(
    config: &MethodConfig,
    graph: &GraphView,
    task_type: &str,
    n: usize,
    token_dim: usize,
    encoder_width: usize,
) -> Result<serde_json::Value, String> {
    let stack = graph.stacks.first();
    let init = match config.get_string("init")?.as_str() {
        "sample_vocab" => "SAMPLE_VOCAB",
        // The prompt is saved, so how it started does not matter to a reader; PEFT's TEXT
        // init would need a tokenizer name to reload.
        _ => "RANDOM",
    };
    let mut files = json!({
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": n,
        "token_dim": token_dim,
        "num_transformer_submodules": if graph.stacks.len() > 1 { 2 } else { 1 },
        "num_attention_heads": stack.map_or(0, |s| s.n_heads),
        "num_layers": stack.map_or(0, |s| s.n_layers),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": null,
        "tokenizer_name_or_path": null,
        "tokenizer_kwargs": null,
        "inference_mode": true,
        "base_model_name_or_path": null,
        "revision": null,
        "auto_mapping": null,
        "modules_to_save": if matches!(task_type, "SEQ_CLS" | "TOKEN_CLS") {
            json!(["classifier", "score"])
        } else {
            json!(null)
        },
    });
    if encoder_width > 0 {
        // PEFT's P_TUNING file holds the encoder's output (the baked prompt), as here.
        let object = files.as_object_mut().expect("a JSON object");
        for key in [
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
        ] {
            object.remove(key);
        }
        object.insert("peft_type".into(), json!("P_TUNING"));
        object.insert("encoder_reparameterization_type".into(), json!("MLP"));
        object.insert("encoder_hidden_size".into(), json!(encoder_width));
        object.insert("encoder_num_layers".into(), json!(2));
        object.insert("encoder_dropout".into(), json!(0.0));
    }
    Ok(files)
}

/// PEFT's task type for the model: `CAUSAL_LM` for a decoder-only model, `SEQ_2_SEQ_LM` for
/// an encoder–decoder, else `TOKEN_CLS` or `SEQ_CLS` by the rank of the first output.
fn auto_task_type(graph: &GraphView) -> String {
    let decoder = graph
        .stacks
        .iter()
        .any(|s| s.kind == Some(StackKind::Decoder));
    let task = match (graph.stacks.len(), decoder) {
        (n, true) if n > 1 => "SEQ_2_SEQ_LM",
        (_, true) => "CAUSAL_LM",
        _ => {
            let rank = graph
                .outputs
                .first()
                .and_then(|o| graph.value(o))
                .and_then(|v| v.shape.as_ref())
                .map(Vec::len);
            match rank {
                Some(3) => "TOKEN_CLS",
                Some(2) => "SEQ_CLS",
                _ => "FEATURE_EXTRACTION",
            }
        }
    };
    task.to_owned()
}
