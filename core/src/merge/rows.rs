//! The merge's row engine: rewrites one weight a block of stored rows at a time — decode the
//! rows to f32, apply an update, encode them back — without ever holding the whole matrix in f32.
//!
//! It is built to run near memory bandwidth on large models:
//! - a weight whose bytes the graph alone owns is rewritten in place, so no new pages are
//!   touched; a shared or file-mapped weight is read from where it lies and written once into a
//!   new buffer;
//! - the rows are split across the machine's cores;
//! - float16 rows are converted by the CPU's F16C instructions where it has them, and the
//!   updates run on the widest vector unit present on a block of rows held in cache; the
//!   low-rank update of input-major float16 weights (the common layout of exported
//!   transformers) has a fused AVX-512 kernel that goes from the stored halves to the stored
//!   halves with no f32 copy in between.
//!
//! Every path gives the same bits, those of the scalar definition: each element's low-rank
//! delta is summed in f32 from −0 by one fused multiply-add per term, in order of rank, then
//! added to the element once (as PEFT adds `B·A·scale` to the weight), and the result is
//! rounded back to nearest-even. Starting from −0 makes a delta with no terms leave the weight's
//! bits alone.

use std::sync::Arc;

use graft_plugin_sdk::{DType, WeightLayout};

use super::MergeReport;
use crate::ir::{Graph, TensorData};
use crate::{Error, Result};

/// Below this many bytes a weight is rewritten on the calling thread alone: starting a thread
/// costs more than it saves.
const BYTES_PER_THREAD: usize = 1 << 20;

/// Stored rows handed to an update together, as one block: 16 rows of a 4096-wide weight are
/// 256 KiB in f32, which stay in the second-level cache while they are updated, and the fused
/// kernel uses each panel of B for all 16 before it moves on.
const ROWS_PER_BLOCK: usize = 16;

/// Rewrites the weight `name`, stored in `layout` for `n_in` inputs and `n_out` outputs, a
/// block of stored rows at a time: `update(first, rows)` sees consecutive whole rows as f32,
/// starting at row `first`; row `i` is input `i` (`n_out` values) for
/// [`WeightLayout::InOut`], row `j` is output `j` (`n_in` values) for [`WeightLayout::OutIn`].
/// `update` is called from several threads, each row exactly once, in no particular order; a
/// closure passed as `update` needs its parameter types written out (`|first: usize, rows: &mut
/// [f32]|`), since it is taken as any [`RowUpdate`].
pub(super) fn update_weight(
    graph: &mut Graph,
    name: &str,
    layout: WeightLayout,
    [n_in, n_out]: [usize; 2],
    report: &mut MergeReport,
    update: impl RowUpdate,
) -> Result<()> {
    let tensor = graph.initializer_mut(name).ok_or_else(|| Error::Tensor {
        name: name.to_owned(),
        reason: "the merge needs it, but the model has no initializer of that name".into(),
    })?;
    let codec = tensor
        .dtype
        .sdk()
        .and_then(Codec::new)
        .ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: format!(
                "{} is not a floating-point type graft can merge",
                tensor.dtype
            ),
        })?;
    let len = tensor.raw_bytes()?.len();
    if len % codec.width != 0 || len / codec.width != n_in * n_out {
        return Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!(
                "has {} elements, expected {n_in}×{n_out}",
                len / codec.width
            ),
        });
    }
    let row_len = match layout {
        WeightLayout::InOut => n_out,
        WeightLayout::OutIn => n_in,
    };
    let owned = match &mut tensor.data {
        TensorData::Raw(bytes) => Arc::get_mut(bytes),
        _ => None,
    };
    if let Some(bytes) = owned {
        rewrite_rows(None, bytes, codec, row_len, &update);
    } else {
        let source = tensor.raw_bytes()?;
        // SAFETY: zeroed bytes are valid `u8`s. The allocator hands a large buffer out as fresh
        // zero pages, so nothing writes it before the rows do.
        let mut updated: Arc<[u8]> = unsafe { Arc::new_zeroed_slice(len).assume_init() };
        let destination = Arc::get_mut(&mut updated).expect("a fresh allocation has one owner");
        rewrite_rows(Some(source), destination, codec, row_len, &update);
        tensor.data = TensorData::Raw(updated);
    }
    report.bytes_touched += len;
    if !report.updated_weights.iter().any(|w| w == name) {
        report.updated_weights.push(name.to_owned());
    }
    Ok(())
}

/// Writes every `row_len`-element row of `destination`: decoded from the same row of `source`,
/// or of `destination` itself when `source` is `None`, updated, and encoded. The rows are shared out across the cores in contiguous blocks.
fn rewrite_rows(
    source: Option<&[u8]>,
    destination: &mut [u8],
    codec: Codec,
    row_len: usize,
    update: &impl RowUpdate,
) {
    let row_bytes = row_len * codec.width;
    if row_bytes == 0 {
        return;
    }
    let rows = destination.len() / row_bytes;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores
        .min(destination.len() / BYTES_PER_THREAD)
        .clamp(1, rows.max(1));
    let rows_per_thread = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut blocks = destination
            .chunks_mut(rows_per_thread * row_bytes)
            .enumerate();
        let first = blocks.next();
        for (block, rows) in blocks {
            let first_row = block * rows_per_thread;
            scope.spawn(move || rewrite_block(source, rows, first_row, codec, row_len, update));
        }
        if let Some((_, rows)) = first {
            rewrite_block(source, rows, 0, codec, row_len, update);
        }
    });
}

/// An update of a weight's rows, applied a block of consecutive whole rows at a time.
/// Every `Fn(first_row, rows)` is one, with no float16 kernel of its own.
pub(super) trait RowUpdate: Sync {
    /// Updates `rows`, decoded to f32, the first of which is row `first`.
    fn update(&self, first: usize, rows: &mut [f32]);

    /// Rewrites whole float16 rows from `source` into `destination` (the same rows, read from
    /// `destination` itself when `source` is `None`), the first of which is row `first`,
    /// without an f32 copy in between, giving the same bits as [`RowUpdate::update`].
    /// Returns false, having written nothing, where there is no such kernel for this CPU.
    fn update_f16(&self, _first: usize, _source: Option<&[u8]>, _destination: &mut [u8]) -> bool {
        false
    }
}

impl<F: Fn(usize, &mut [f32]) + Sync> RowUpdate for F {
    fn update(&self, first: usize, rows: &mut [f32]) {
        self(first, rows)
    }
}

/// [`rewrite_rows`] for the rows of `rows`, the first of which is row `first_row`.
fn rewrite_block(
    source: Option<&[u8]>,
    rows: &mut [u8],
    first_row: usize,
    codec: Codec,
    row_len: usize,
    update: &impl RowUpdate,
) {
    let row_bytes = row_len * codec.width;
    let mut values = vec![0f32; ROWS_PER_BLOCK * row_len];
    for (block, bytes) in rows.chunks_mut(ROWS_PER_BLOCK * row_bytes).enumerate() {
        let first = first_row + block * ROWS_PER_BLOCK;
        let block_source = source.map(|source| &source[first * row_bytes..][..bytes.len()]);
        if codec.dtype == DType::Float16 && update.update_f16(first, block_source, bytes) {
            continue;
        }
        let values = &mut values[..bytes.len() / codec.width];
        codec.decode(block_source.unwrap_or(bytes), values);
        update.update(first, values);
        codec.encode(values, bytes);
    }
}

/// Converts rows between a floating-point element type's little-endian bytes and f32: the
/// SDK's conversions, with float16 done by the F16C instructions where the CPU has them.
#[derive(Clone, Copy)]
struct Codec {
    dtype: DType,
    /// Bytes per element.
    width: usize,
}

impl Codec {
    /// The codec for `dtype`, or `None` if it is not a type the merge rewrites.
    fn new(dtype: DType) -> Option<Codec> {
        match dtype {
            DType::Float | DType::Float16 | DType::Bfloat16 | DType::Double => Some(Codec {
                dtype,
                width: dtype.byte_len(1)?,
            }),
            _ => None,
        }
    }

    /// Decodes `bytes` (exactly `row.len()` elements) into `row`.
    fn decode(self, bytes: &[u8], row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.dtype == DType::Float16 && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and so AVX), checked just above.
            return unsafe { f16c::decode(bytes, row) };
        }
        let decoded = graft_plugin_sdk::bytes_to_f32_into(self.dtype, bytes, row);
        assert!(decoded, "whole rows of a floating type");
    }

    /// Encodes `row` into `bytes` (exactly `row.len()` elements), rounding to nearest even as
    /// [`graft_plugin_sdk::f32_to_bytes`] does.
    fn encode(self, row: &[f32], bytes: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.dtype == DType::Float16 && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and so AVX), checked just above.
            return unsafe { f16c::encode(row, bytes) };
        }
        let encoded = graft_plugin_sdk::f32_to_bytes_into(self.dtype, row, bytes);
        assert!(encoded, "whole rows of a floating type");
    }
}

/// float16 ⇄ f32 conversion of whole rows with the F16C instructions, 8 elements at a time.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    use graft_plugin_sdk::{bytes_to_f32_into, f32_to_bytes_into, DType};

    /// [`super::Codec::decode`] for float16. The caller ensures the CPU has F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn decode(bytes: &[u8], row: &mut [f32]) {
        assert_eq!(bytes.len(), 2 * row.len());
        let vectors = row.len() / 8 * 8;
        for i in (0..vectors).step_by(8) {
            // SAFETY: elements i..i+8 lie inside both slices (checked lengths); the loads and
            // stores are unaligned.
            unsafe {
                let halves = _mm_loadu_si128(bytes.as_ptr().add(2 * i).cast());
                _mm256_storeu_ps(row.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
            }
        }
        bytes_to_f32_into(DType::Float16, &bytes[2 * vectors..], &mut row[vectors..]);
    }

    /// [`super::Codec::encode`] for float16, rounding to nearest even. The caller ensures the
    /// CPU has F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn encode(row: &[f32], bytes: &mut [u8]) {
        assert_eq!(bytes.len(), 2 * row.len());
        let vectors = row.len() / 8 * 8;
        for i in (0..vectors).step_by(8) {
            // SAFETY: as in `decode`.
            unsafe {
                let values = _mm256_loadu_ps(row.as_ptr().add(i));
                let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(values);
                _mm_storeu_si128(bytes.as_mut_ptr().add(2 * i).cast(), halves);
            }
        }
        f32_to_bytes_into(DType::Float16, &row[vectors..], &mut bytes[2 * vectors..]);
    }
}

/// Defines `$name`, which runs the portable `$tiled` compiled for the widest vector unit the
/// CPU has (the tiled loops are written so that the compiler vectorizes them), with tiles of
/// 128 elements on AVX-512 (8 registers of independent sums, enough to hide the adds' latency)
/// and 64 elsewhere.
macro_rules! on_widest_vector_unit {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $tiled:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $tiled::<128>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $tiled::<64>($($arg),*)
                }
                let fma = std::arch::is_x86_feature_detected!("fma");
                if fma && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if fma && std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $tiled::<64>($($arg),*)
        }
    };
}

/// The low-rank update of rows stored input-major: [`add_low_rank_rows`] with row `i`'s
/// coefficients at `coefficients[i·rank..(i + 1)·rank]`, and a fused float16 kernel on CPUs
/// with AVX-512.
pub(super) struct LowRankRows<'a> {
    /// `scale · A`, `[n_in, rank]` row-major.
    pub coefficients: &'a [f32],
    /// The rows of B, `rank` of them, each as long as a weight row.
    pub b: &'a [&'a [f32]],
}

impl RowUpdate for LowRankRows<'_> {
    fn update(&self, first: usize, rows: &mut [f32]) {
        add_low_rank_rows(rows, &self.coefficients[first * self.b.len()..], self.b);
    }

    fn update_f16(&self, first: usize, source: Option<&[u8]>, destination: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let rank = self.b.len();
            let row_len = self.b.first().map_or(0, |b| b.len());
            let supported = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if supported && rank > 0 && row_len > 0 {
                let rows = destination.len() / (2 * row_len);
                let coefficients = &self.coefficients[first * rank..][..rows * rank];
                assert!(source.is_none_or(|s| s.len() == destination.len()));
                assert_eq!(destination.len(), 2 * rows * row_len);
                let destination = destination.as_mut_ptr();
                let source = source.map_or(destination.cast_const(), <[u8]>::as_ptr);
                // SAFETY: the CPU has the features (checked above); `source` and `destination`
                // hold `rows` whole float16 rows of `row_len` elements (asserted above), every
                // `b` row has `row_len` elements, and there are `rows · rank` coefficients.
                unsafe { avx512::low_rank_rows_f16(source, destination, coefficients, self.b) };
                return true;
            }
        }
        let _ = (first, source, destination);
        false
    }
}

/// The fused float16 kernel of [`LowRankRows`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Elements of a row held in registers (8 of 16) while every term is added to them.
    const TILE: usize = 128;

    /// Bytes of B used for a panel of columns, done down all the rows before the next panel:
    /// well inside a 48 KiB first-level data cache.
    const PANEL_BYTES: usize = 32 << 10;

    /// For each row r of the float16 rows at `source`, writes to the same row at `destination`
    /// (which may be `source` itself) `row + Σ_k coefficients[r·rank + k] · b[k]`, the sum
    /// formed as [`super::add_low_rank_rows`] does, rounded to nearest even. The columns are done a panel at a time down all the rows, so that the panel of `b`
    /// stays in the first-level cache while each row's segment streams through in 128-element
    /// tiles held in registers. Each tile asks for the same tile of the next block of rows (the
    /// next call's) to be fetched into the second-level cache: in place, the rows are read and
    /// written back, and without these requests too few reads are in flight to reach memory
    /// bandwidth (measured: in-place merge at ~40% of memcpy's bandwidth without, ~60% with).
    ///
    /// # Safety
    /// The CPU has AVX-512F, FMA and F16C; `source` and `destination` each point to
    /// `coefficients.len() / b.len()` rows of `b[0].len()` float16 values; every `b[k]` has
    /// `b[0].len()` values.
    #[target_feature(enable = "avx512f,fma,f16c")]
    pub(super) unsafe fn low_rank_rows_f16(
        source: *const u8,
        destination: *mut u8,
        coefficients: &[f32],
        b: &[&[f32]],
    ) {
        let (rank, row_len) = (b.len(), b[0].len());
        let rows = coefficients.len() / rank;
        let tiled = row_len / TILE * TILE;
        let panel = (PANEL_BYTES / (4 * rank)).max(TILE) / TILE * TILE;
        for panel_start in (0..tiled).step_by(panel) {
            for (r, coefficients) in coefficients.chunks_exact(rank).enumerate() {
                for start in (panel_start..tiled.min(panel_start + panel)).step_by(TILE) {
                    let offset = 2 * (r * row_len + start);
                    // The same tile one block of rows further on, where the next call will
                    // start: asking for it now keeps enough reads in flight to stream.
                    let ahead = source.wrapping_add(offset + 2 * rows * row_len);
                    for line in 0..2 * TILE / 64 {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line).cast());
                    }
                    // SAFETY (all the loads and stores): elements start..start + TILE of row r lie
                    // inside the rows, and of every b[k] (the caller's contract).
                    unsafe {
                        let mut sums = [_mm512_set1_ps(-0.0); TILE / 16];
                        for (c, b) in coefficients.iter().zip(b) {
                            if *c == 0.0 {
                                continue;
                            }
                            let c = _mm512_set1_ps(*c);
                            let b = b.as_ptr().add(start);
                            for (v, sum) in sums.iter_mut().enumerate() {
                                *sum = _mm512_fmadd_ps(c, _mm512_loadu_ps(b.add(16 * v)), *sum);
                            }
                        }
                        for (v, sum) in sums.iter().enumerate() {
                            let halves = _mm256_loadu_si256(source.add(offset + 32 * v).cast());
                            let sum = _mm512_add_ps(_mm512_cvtph_ps(halves), *sum);
                            let halves = _mm512_cvtps_ph::<
                                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                            >(sum);
                            _mm256_storeu_si256(destination.add(offset + 32 * v).cast(), halves);
                        }
                    }
                }
            }
        }
        for r in 0..rows {
            for j in tiled..row_len {
                let at = 2 * (r * row_len + j);
                // SAFETY: element j of row r lies inside the rows.
                let value = graft_plugin_sdk::f16_bits_to_f32(unsafe {
                    source.add(at).cast::<u16>().read_unaligned()
                });
                let mut delta = -0.0f32;
                for (c, b) in coefficients[r * rank..][..rank].iter().zip(b) {
                    if *c != 0.0 {
                        delta = c.mul_add(b[j], delta);
                    }
                }
                let bits = graft_plugin_sdk::f32_to_f16_bits(value + delta);
                // SAFETY: as above.
                unsafe { destination.add(at).cast::<u16>().write_unaligned(bits) };
            }
        }
    }
}

on_widest_vector_unit! {
    /// Adds `Σ_k coefficients[r·rank + k] · b[k]` to each row `r` of `rows` (whole rows of
    /// `b[k].len()` elements, `rank = b.len()`): each element's sum starts at −0 and takes one
    /// fused multiply-add per term, in order of k, skipping the terms whose coefficient is zero;
    /// then it is added to the element.
    pub(super) fn add_low_rank_rows =
        add_low_rank_rows_tiled(rows: &mut [f32], coefficients: &[f32], b: &[&[f32]])
}

/// [`add_low_rank_rows`] a tile of `TILE` columns at a time, down all the rows, so that the
/// tile of `b` stays in the first-level cache while it is used for every row, and each row's
/// tile stays in registers while every term is added.
#[inline(always)]
fn add_low_rank_rows_tiled<const TILE: usize>(
    rows: &mut [f32],
    coefficients: &[f32],
    b: &[&[f32]],
) {
    let (rank, row_len) = (b.len(), b.first().map_or(0, |b| b.len()));
    if rank == 0 || row_len == 0 {
        return;
    }
    for start in (0..row_len).step_by(TILE) {
        let end = (start + TILE).min(row_len);
        let rows = rows
            .chunks_exact_mut(row_len)
            .zip(coefficients.chunks_exact(rank));
        for (row, coefficients) in rows {
            let terms = coefficients.iter().zip(b).filter(|(c, _)| **c != 0.0);
            if end - start == TILE {
                let mut deltas = [-0.0f32; TILE];
                for (c, b) in terms {
                    for (delta, b) in deltas.iter_mut().zip(&b[start..start + TILE]) {
                        *delta = c.mul_add(*b, *delta);
                    }
                }
                for (value, delta) in row[start..start + TILE].iter_mut().zip(&deltas) {
                    *value += delta;
                }
            } else {
                for j in start..end {
                    let mut delta = -0.0f32;
                    for (c, b) in terms.clone() {
                        delta = c.mul_add(b[j], delta);
                    }
                    row[j] += delta;
                }
            }
        }
    }
}

on_widest_vector_unit! {
    /// Adds `Σ_k b[r·rank + k] · columns[k]` to each row `r` of `rows` (whole rows of
    /// `columns[k].len()` elements, `rank = columns.len()`): each element's sum starts at −0 and
    /// takes one fused multiply-add per term, in order of k, skipping the k whose coefficient
    /// `columns[k][i]` is zero; then it is added to the element.
    pub(super) fn add_low_rank_columns =
        add_low_rank_columns_tiled(rows: &mut [f32], columns: &[&[f32]], b: &[f32])
}

/// [`add_low_rank_columns`] a tile at a time, down all the rows, as
/// [`add_low_rank_rows_tiled`] does.
#[inline(always)]
fn add_low_rank_columns_tiled<const TILE: usize>(rows: &mut [f32], columns: &[&[f32]], b: &[f32]) {
    let (rank, row_len) = (columns.len(), columns.first().map_or(0, |c| c.len()));
    if rank == 0 || row_len == 0 {
        return;
    }
    let add = |delta: &mut f32, coefficient: f32, b: f32| {
        let sum = coefficient.mul_add(b, *delta);
        *delta = if coefficient == 0.0 { *delta } else { sum };
    };
    for start in (0..row_len).step_by(TILE) {
        let end = (start + TILE).min(row_len);
        for (row, b) in rows.chunks_exact_mut(row_len).zip(b.chunks_exact(rank)) {
            if end - start == TILE {
                let mut deltas = [-0.0f32; TILE];
                for (column, b) in columns.iter().zip(b) {
                    for (delta, c) in deltas.iter_mut().zip(&column[start..start + TILE]) {
                        add(delta, *c, *b);
                    }
                }
                for (value, delta) in row[start..start + TILE].iter_mut().zip(&deltas) {
                    *value += delta;
                }
            } else {
                for j in start..end {
                    let mut delta = -0.0f32;
                    for (column, b) in columns.iter().zip(b) {
                        add(&mut delta, column[j], *b);
                    }
                    row[j] += delta;
                }
            }
        }
    }
}

/// `row[j] *= scale[j]`.
pub(super) fn multiply(row: &mut [f32], scale: &[f32]) {
    for (w, s) in row.iter_mut().zip(scale) {
        *w *= s;
    }
}
