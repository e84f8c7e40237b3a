//! Insertions that lengthen a sequence axis: soft prompts, key/value prefixes, and the
//! attention-mask extension both need.

use super::{attr_int, splitmix64, PatchBuilder};
use crate::dtype::DType;
use crate::error::Result;
use crate::patch::Init;

/// Names created by [`PatchBuilder::prepend_to_sequence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptNames {
    /// The learned prompt `[n_virtual, hidden]`; `None` when `n_virtual` is 0.
    pub prompt: Option<String>,
    /// The extended sequence (the input value itself when `n_virtual` is 0).
    pub output: String,
    /// The extended attention mask, when a mask was given.
    pub mask_output: Option<String>,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// How [`PatchBuilder::extend_sequence_input`] fills the positions it prepends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceFill {
    /// Every prepended position holds this value (1 for a mask, 0 for token types).
    Value(i64),
    /// Every prepended position repeats the sequence's first element (token ids: the
    /// sequence's start token, never the padding a model may derive positions from).
    CopyFirst,
}

/// Names created by [`PatchBuilder::extend_mask`] and
/// [`PatchBuilder::extend_sequence_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskNames {
    /// The extended mask (the mask itself when nothing was prepended).
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::prefix_key_values`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixNames {
    /// Learned key prefix `[1, heads, n_prefix, head_dim]`; `None` when `n_prefix` is 0.
    pub key_prefix: Option<String>,
    /// Learned value prefix `[1, heads, n_prefix, head_dim]`; `None` when `n_prefix` is 0.
    pub value_prefix: Option<String>,
    /// The extended keys.
    pub key_output: String,
    /// The extended values.
    pub value_output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

impl PatchBuilder<'_> {
    /// Puts a learned soft prompt at the start of a sequence (prompt tuning): `P [n_virtual,
    /// hidden]` (trainable, `embedding_output`'s type, initialised by `init`) is broadcast over
    /// the batch and concatenated before `embedding_output` `[batch, seq, hidden]` along axis
    /// 1; later readers of `embedding_output` read the result. With `placeholders`, the
    /// embedded sequence already starts with `n_virtual` placeholder positions (its token ids
    /// were lengthened by [`PatchBuilder::extend_sequence_input`], so that everything the
    /// graph derives from their shape sees the longer sequence), and the prompt replaces them
    /// instead of preceding them. When `attention_mask` names the mask graph input, it is
    /// extended with ones ([`PatchBuilder::extend_mask`]). `n_virtual = 0` emits nothing.
    ///
    /// Nodes: `Unsqueeze(P, [0])`, with `placeholders` `Slice(e, [n_virtual], [i64::MAX],
    /// [1])`, `Shape(e)`, `Gather(·, [0])` (the batch size), `Constant([1, 1])`, `Concat` (the
    /// target `[batch, 1, 1]`), `Expand`, `Concat(P_batch, e, axis = 1)`. Every downstream
    /// value's sequence axis, graph outputs included, is `n_virtual` longer than the token
    /// ids'; the training loss skips those positions.
    pub fn prepend_to_sequence(
        &mut self,
        embedding_output: &str,
        attention_mask: Option<&str>,
        n_virtual: usize,
        hidden: usize,
        init: Init,
        placeholders: bool,
    ) -> Result<PromptNames> {
        if n_virtual == 0 {
            return Ok(self.no_prompt(embedding_output, attention_mask));
        }
        let dtype = self.value_dtype(embedding_output)?;
        let stem = self.stem(&format!("{}.prompt", self.prefix));
        let prompt = self.parameter(
            &format!("{stem}.embedding"),
            dtype,
            vec![n_virtual, hidden],
            init,
            true,
        );
        self.put_prompt(
            &stem,
            embedding_output,
            attention_mask,
            &prompt,
            n_virtual,
            placeholders,
        )
    }

    /// [`PatchBuilder::prepend_to_sequence`] with a prompt the patch computes: `prompt`
    /// `[n_virtual, hidden]` (a prompt encoder's output, as in P-Tuning) instead of a new
    /// parameter. The returned names' `prompt` is `prompt`. `n_virtual = 0` emits nothing.
    pub fn prepend_value_to_sequence(
        &mut self,
        embedding_output: &str,
        attention_mask: Option<&str>,
        prompt: &str,
        n_virtual: usize,
        placeholders: bool,
    ) -> Result<PromptNames> {
        if n_virtual == 0 {
            return Ok(self.no_prompt(embedding_output, attention_mask));
        }
        let stem = self.stem(&format!("{}.prompt", self.prefix));
        self.put_prompt(
            &stem,
            embedding_output,
            attention_mask,
            prompt,
            n_virtual,
            placeholders,
        )
    }

    /// What an empty prompt leaves: the sequence and the mask as they are, no nodes.
    fn no_prompt(&self, embedding_output: &str, attention_mask: Option<&str>) -> PromptNames {
        PromptNames {
            prompt: None,
            output: self.current(embedding_output),
            mask_output: attention_mask.map(|m| self.current(m)),
            nodes: vec![],
        }
    }

    /// The nodes of [`PatchBuilder::prepend_value_to_sequence`], named under `stem`.
    fn put_prompt(
        &mut self,
        stem: &str,
        embedding_output: &str,
        attention_mask: Option<&str>,
        prompt: &str,
        n_virtual: usize,
        placeholders: bool,
    ) -> Result<PromptNames> {
        let ((output, mask_output), nodes) = self.block(|builder| {
            let e = builder.current(embedding_output);
            let axes = builder.constant_ints(&format!("{stem}.axes"), &[0]);
            let p3 = builder.op(
                &format!("{stem}.unsqueeze"),
                "Unsqueeze",
                &[prompt, &axes],
                &[],
            );
            let onto = if placeholders {
                let start = builder.constant_ints(&format!("{stem}.start"), &[n_virtual as i64]);
                let end = builder.constant_ints(&format!("{stem}.end"), &[i64::MAX]);
                let axis = builder.constant_ints(&format!("{stem}.axis"), &[1]);
                builder.op(
                    &format!("{stem}.tokens"),
                    "Slice",
                    &[&e, &start, &end, &axis],
                    &[],
                )
            } else {
                e.clone()
            };
            let output = builder.prepend_over_batch(stem, &p3, &onto, &[1, 1], 1);
            if placeholders {
                builder.rewire(&e, &output);
            }
            let mask_output = match attention_mask {
                Some(mask) => Some(builder.extend_mask(mask, n_virtual)?.output),
                None => None,
            };
            Ok((output, mask_output))
        })?;
        Ok(PromptNames {
            prompt: Some(prompt.to_owned()),
            output,
            mask_output,
            nodes,
        })
    }

    /// Prepends `n` ones to an attention mask `[batch, seq]` along axis 1, so positions
    /// prepended by [`PatchBuilder::prepend_to_sequence`] or
    /// [`PatchBuilder::prefix_key_values`] are attended. Every consumer of the mask reads
    /// `Concat(ones[batch, n], mask, axis = 1)`. `n = 0` emits nothing. (That is
    /// [`PatchBuilder::extend_sequence_input`] with [`SequenceFill::Value`]`(1)`.)
    pub fn extend_mask(&mut self, mask: &str, n: usize) -> Result<MaskNames> {
        self.extend_sequence(mask, n, SequenceFill::Value(1), "mask")
    }

    /// Prepends `n` positions to a `[batch, seq]` value along axis 1 (token ids, token types,
    /// an attention mask), filled as `fill` says, and makes every consumer read
    /// `Concat(prefix[batch, n], value, axis = 1)`. Whatever the graph computes
    /// from the value's shape (position ids, causal masks, reshape targets) then sees the
    /// longer sequence. `n = 0` emits nothing.
    ///
    /// Nodes: `Shape(value)`, `Gather(·, [0])`, `Constant([n])`, `Concat` (the shape
    /// `[batch, n]`); for [`SequenceFill::Value`] `Constant([v])`, `Expand` and, unless the
    /// value is `int64` or of unknown type, `Cast(to = its type)` (`ConstantOfShape` would need
    /// a tensor attribute); for [`SequenceFill::CopyFirst`] `Constant`s and `Slice(value, 0, 1,
    /// axis 1)`, `Expand`; then `Concat`.
    pub fn extend_sequence_input(
        &mut self,
        value: &str,
        n: usize,
        fill: SequenceFill,
    ) -> Result<MaskNames> {
        self.extend_sequence(value, n, fill, &format!("extend_{value}"))
    }

    /// [`PatchBuilder::extend_sequence_input`] with its nodes named under
    /// `<prefix>.<stem_hint>`.
    fn extend_sequence(
        &mut self,
        value: &str,
        n: usize,
        fill: SequenceFill,
        stem_hint: &str,
    ) -> Result<MaskNames> {
        let m = self.current(value);
        if n == 0 {
            return Ok(MaskNames {
                output: m,
                nodes: vec![],
            });
        }
        let stem = self.stem(&format!("{}.{stem_hint}", self.prefix));
        let dtype = self.graph.dtype_of(value).unwrap_or(DType::Int64);
        let (output, nodes) = self.block(|builder| {
            let batch = builder.batch_size(&stem, &m);
            let len = builder.constant_ints(&format!("{stem}.len"), &[n as i64]);
            let shape = builder.op(
                &format!("{stem}.shape"),
                "Concat",
                &[&batch, &len],
                &[attr_int("axis", 0)],
            );
            let prefix = match fill {
                SequenceFill::Value(v) => {
                    let v = builder.constant_ints(&format!("{stem}.fill"), &[v]);
                    let filled =
                        builder.op(&format!("{stem}.filled"), "Expand", &[&v, &shape], &[]);
                    if dtype == DType::Int64 {
                        filled
                    } else {
                        builder.op(
                            &format!("{stem}.cast"),
                            "Cast",
                            &[&filled],
                            &[attr_int("to", dtype.onnx_code() as i64)],
                        )
                    }
                }
                SequenceFill::CopyFirst => {
                    let zero = builder.constant_ints(&format!("{stem}.first"), &[0]);
                    let one = builder.constant_ints(&format!("{stem}.end"), &[1]);
                    let first = builder.op(
                        &format!("{stem}.first_column"),
                        "Slice",
                        &[&m, &zero, &one, &one],
                        &[],
                    );
                    builder.op(&format!("{stem}.filled"), "Expand", &[&first, &shape], &[])
                }
            };
            let output = builder.op(
                &format!("{stem}.concat"),
                "Concat",
                &[&prefix, &m],
                &[attr_int("axis", 1)],
            );
            builder.rewire(&m, &output);
            Ok(output)
        })?;
        Ok(MaskNames { output, nodes })
    }

    /// Prepends learned keys and values to one attention (prefix tuning): `Pk` and `Pv`, each
    /// `[1, n_heads, n_prefix, head_dim]` (trainable, `key_states`' type; `Pk` initialised by
    /// `init`, `Pv` by `init` with a seed derived from its seed), are broadcast over the batch
    /// and concatenated before `key_states` and `value_states` `[batch, n_heads, seq,
    /// head_dim]` along axis 2. `n_heads` is the number of key/value heads (`n_kv_heads`
    /// under grouped-query attention). `n_prefix = 0` emits nothing.
    ///
    /// The attention mask must be extended the same way (call
    /// [`PatchBuilder::extend_mask`] once on the mask input for the whole model), and a
    /// causal mask built inside the graph must admit the prefix positions; this helper
    /// touches only the keys and values. Nodes per side: `Shape`, `Gather(·, [0])`,
    /// `Constant([1, 1, 1])`, `Concat`, `Expand`, `Concat(axis = 2)`.
    pub fn prefix_key_values(
        &mut self,
        key_states: &str,
        value_states: &str,
        n_heads: usize,
        head_dim: usize,
        n_prefix: usize,
        init: Init,
    ) -> Result<PrefixNames> {
        if n_prefix == 0 {
            return Ok(PrefixNames {
                key_prefix: None,
                value_prefix: None,
                key_output: self.current(key_states),
                value_output: self.current(value_states),
                nodes: vec![],
            });
        }
        let dtype = self.value_dtype(key_states)?;
        let value_init = match init.seed() {
            Some(seed) => init.clone().with_seed(splitmix64(seed)),
            None => init.clone(),
        };
        let (mut made, nodes) = self.block(|builder| {
            let mut made = Vec::new();
            for (states, side, init) in [
                (key_states, "key", init),
                (value_states, "value", value_init),
            ] {
                let stem = builder.stem(&format!("{}.{states}", builder.prefix));
                let prefix = builder.parameter(
                    &format!("{stem}.{side}_prefix"),
                    dtype,
                    vec![1, n_heads, n_prefix, head_dim],
                    init,
                    true,
                );
                let s = builder.current(states);
                let output = builder.prepend_over_batch(&stem, &prefix, &s, &[1, 1, 1], 2);
                made.push((prefix, output));
            }
            Ok(made)
        })?;
        let (value_prefix, value_output) = made.pop().unwrap_or_default();
        let (key_prefix, key_output) = made.pop().unwrap_or_default();
        Ok(PrefixNames {
            key_prefix: Some(key_prefix),
            value_prefix: Some(value_prefix),
            key_output,
            value_output,
            nodes,
        })
    }

    /// Repeats `tile` (leading dimension 1) over the batch of `onto` and prepends it to `onto`
    /// along `axis`; later readers of `onto` read the result. Nodes, named under `stem`: the
    /// batch size of `onto`, `Constant(tail)` (the tile's other dims), `Concat` (the target
    /// shape), `Expand`, `Concat(axis)`. Returns the concatenation.
    fn prepend_over_batch(
        &mut self,
        stem: &str,
        tile: &str,
        onto: &str,
        tail: &[i64],
        axis: i64,
    ) -> String {
        let batch = self.batch_size(stem, onto);
        let tail = self.constant_ints(&format!("{stem}.tail"), tail);
        let target = self.op(
            &format!("{stem}.target"),
            "Concat",
            &[&batch, &tail],
            &[attr_int("axis", 0)],
        );
        let expanded = self.op(&format!("{stem}.expand"), "Expand", &[tile, &target], &[]);
        let output = self.op(
            &format!("{stem}.concat"),
            "Concat",
            &[&expanded, onto],
            &[attr_int("axis", axis)],
        );
        self.rewire(onto, &output);
        output
    }

    fn batch_size(&mut self, stem: &str, value: &str) -> String {
        let shape = self.op(&format!("{stem}.input_shape"), "Shape", &[value], &[]);
        let index = self.constant_ints(&format!("{stem}.batch_index"), &[0]);
        self.op(
            &format!("{stem}.batch"),
            "Gather",
            &[&shape, &index],
            &[attr_int("axis", 0)],
        )
    }
}
