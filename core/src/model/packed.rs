//! Weights repacked for decoding on a CPU.
//!
//! A decode step multiplies a few rows by every weight matrix of the model. libtorch's plain
//! linear layers re-lay each weight into the blocked format oneDNN's kernels read on every call,
//! which costs about as much as the product itself at 16 rows (see docs/benchmarks.md). Here
//! each weight is repacked once per sampling call (q/k/v fused into one matrix, gate/up into
//! another, the rows of q and k reordered so that rotary embeddings become one complex product
//! per step, see `llama::pair_halves`), in one of two [`Layout`]s:
//!
//! - [`Layout::Panels`], f32 weights on a CPU with AVX-512: panels of 16 outputs that sipt's own
//!   kernels (`core/cpp/panel_linear.cpp`) read once, in order, per product. At the few rows of a
//!   decode step they run near the memory's bandwidth, where oneDNN's reach about half of it
//!   (docs/benchmarks.md); they match the plain products up to f32 rounding (tests).
//! - [`Layout::Onednn`], every other case: oneDNN's blocked format, through libtorch's own
//!   `mkldnn::_reorder_linear_weight` and `mkldnn::_linear_pointwise` kernels, the same products
//!   the plain path computes (bit-identical in the tests), only without the repeated repacking.
//!   f32 weights whose product rows would be a multiple of 4 KiB get zero rows more (see
//!   `packed_rows`).
//!
//! The packed weights are a snapshot: [`Llama::pack`] makes them from the current variables and
//! they never see later updates, so sampling packs again at each call. They serve inference
//! only (no autograd) and only on a CPU.

use super::Llama;
use std::ffi::{c_char, CStr};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn sipt_reorder_linear_weight(
        weight: *const C_tensor,
        batch: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_linear_packed(
        input: *const C_tensor,
        packed: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_panels_supported() -> bool;
    fn sipt_panel_linear(
        input: *const C_tensor,
        panels: *const C_tensor,
        out_features: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// How a packed weight is laid out, and so whose kernels multiply by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// oneDNN's blocked format, for its kernels (any type oneDNN has kernels for).
    Onednn,
    /// Panels of 16 outputs `(panels, in, 16)`, an even number of them, zero-padded, for sipt's
    /// AVX-512 kernels (f32 only).
    Panels,
}

/// Outputs per panel: one AVX-512 vector of f32.
const PANEL: i64 = 16;

/// Whether this CPU runs the panel kernels (AVX-512).
pub fn panels_supported() -> bool {
    // SAFETY: a pure query of the CPU's features.
    unsafe { sipt_panels_supported() }
}

/// The layout [`Llama::pack`] gives weights of `kind`: panels for f32 where the CPU has
/// AVX-512 and `panels` allows them, oneDNN's otherwise.
pub fn layout_for(kind: Kind, panels: bool) -> Layout {
    if panels && kind == Kind::Float && panels_supported() {
        Layout::Panels
    } else {
        Layout::Onednn
    }
}

/// Call a shim function that returns a new tensor or fills `err`.
pub(super) fn call(f: impl FnOnce(*mut c_char, usize) -> *mut C_tensor) -> Result<Tensor, String> {
    let mut err = [0 as c_char; 512];
    let ptr = f(err.as_mut_ptr(), err.len());
    if ptr.is_null() {
        // SAFETY: the shim always leaves a NUL-terminated message in `err` when it fails.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        Err(msg.to_string_lossy().into_owned())
    } else {
        // SAFETY: a non-null result is a fresh `at::Tensor*` the shim allocated for us to own.
        Ok(unsafe { Tensor::from_ptr(ptr) })
    }
}

/// A weight matrix packed for decoding (in one of the [`Layout`]s), with the width of its
/// product's rows.
pub struct PackedWeight {
    packed: Tensor,
    layout: Layout,
    /// The weight's output features; the packed matrix may have more (zero) rows.
    out: i64,
    /// The packed matrix's rows: `out`, or more where [`packed_rows`] pads.
    rows: i64,
}

/// Zero rows added below an f32 weight whose product's rows would be a multiple of 4 KiB long.
const PAD_ROWS: i64 = 64;

/// How many rows `weight (out, in)` is packed with. oneDNN writes a product of a few rows
/// straight into its output: when a row of that output is a multiple of 4 KiB (an f32
/// weight with a multiple of 1024 outputs, as the fused gate/up of SmolLM2 has, 2 × 1536), all
/// the rows fall on the same sets of the L1 cache and a product of 16 rows runs at a third
/// of its speed (docs/benchmarks.md). 64 zero rows more break that stride and cost 2% more
/// arithmetic; the padded outputs are dropped. bf16 products were not slower at such widths
/// (measured) and are not padded.
fn packed_rows(weight: &Tensor) -> i64 {
    let out = weight.size()[0];
    // 1024 f32 outputs are 4 KiB.
    if weight.kind() == Kind::Float && out % 1024 == 0 {
        out + PAD_ROWS
    } else {
        out
    }
}

/// `weight (out, in)` repacked in the layout of [`layout_for`] (panels allowed), for inputs of
/// about `rows` rows.
pub fn repack(weight: &Tensor, rows: i64) -> Result<PackedWeight, String> {
    repack_as(weight, rows, layout_for(weight.kind(), true))
}

/// `weight (out, in)` repacked in `layout`; in oneDNN's, for inputs of about `rows` rows and
/// padded where [`packed_rows`] says.
pub fn repack_as(weight: &Tensor, rows: i64, layout: Layout) -> Result<PackedWeight, String> {
    repack_with(weight, rows, layout, true)
}

/// `weight (out, in)` as panels: `(panels, in, 16)` with `panels` even, the outputs past `out`
/// zero.
fn panels(weight: &Tensor) -> Result<Tensor, String> {
    let (out, inputs) = weight
        .size2()
        .map_err(|e| format!("a weight to pack must be a matrix: {e}"))?;
    if weight.kind() != Kind::Float || weight.device() != Device::Cpu {
        return Err(format!(
            "panels hold f32 weights on the CPU, not {:?} on {:?}",
            weight.kind(),
            weight.device()
        ));
    }
    let count = (out + 2 * PANEL - 1) / (2 * PANEL) * 2;
    Ok(with_zero_rows(weight, count * PANEL)
        .view([count, PANEL, inputs])
        .transpose(1, 2)
        .contiguous())
}

/// `weight (out, in)` contiguous, with zero rows below it up to `rows` rows.
fn with_zero_rows(weight: &Tensor, rows: i64) -> Tensor {
    let out = weight.size().first().copied().unwrap_or(0);
    if rows > out {
        let zeros = weight.new_zeros(
            [rows - out, weight.size()[1]],
            (weight.kind(), weight.device()),
        );
        Tensor::cat(&[weight, &zeros], 0)
    } else {
        weight.contiguous()
    }
}

fn repack_with(
    weight: &Tensor,
    rows: i64,
    layout: Layout,
    pad: bool,
) -> Result<PackedWeight, String> {
    let out = weight.size().first().copied().unwrap_or(0);
    if layout == Layout::Panels {
        return Ok(PackedWeight {
            packed: panels(weight)?,
            layout,
            out,
            rows: out,
        });
    }
    let padded = if pad { packed_rows(weight) } else { out };
    let weight = with_zero_rows(weight, padded);
    // SAFETY: both handles stay alive for the call; the shim copies what it keeps.
    let packed =
        call(|err, len| unsafe { sipt_reorder_linear_weight(weight.as_ptr(), rows, err, len) })?;
    Ok(PackedWeight {
        packed,
        layout,
        out,
        rows: padded,
    })
}

impl PackedWeight {
    /// The weight's output features.
    pub fn out_features(&self) -> i64 {
        self.out
    }

    /// Whether the packed matrix has zero rows below the weight's (see [`packed_rows`]) that
    /// its products carry; panel products never do.
    pub fn is_padded(&self) -> bool {
        self.rows > self.out
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }
}

fn try_linear(input: &Tensor, w: &PackedWeight) -> Result<Tensor, String> {
    let input = input.contiguous();
    let packed = &w.packed;
    // SAFETY: both handles stay alive for the call; the shim copies what it keeps.
    call(|err, len| unsafe {
        match w.layout {
            Layout::Onednn => sipt_linear_packed(input.as_ptr(), packed.as_ptr(), err, len),
            Layout::Panels => sipt_panel_linear(input.as_ptr(), packed.as_ptr(), w.out, err, len),
        }
    })
}

/// `input (..., in)` times a [`repack`]ed weight, transposed: `(..., out)`, contiguous.
/// Inference only. `kernels_work` checked the kernel before anything was packed, but oneDNN
/// can still refuse an input (a shape or type it has no kernel for); that is an error for the
/// caller to handle, which sampling does by decoding again without packed weights.
pub fn linear(input: &Tensor, w: &PackedWeight) -> Result<Tensor, String> {
    let y = linear_strided(input, w)?;
    Ok(if w.is_padded() { y.contiguous() } else { y })
}

/// [`linear`] without copying a padded product: `(..., out)` may be a view with longer rows.
pub fn linear_strided(input: &Tensor, w: &PackedWeight) -> Result<Tensor, String> {
    let y = try_linear(input, w).map_err(|e| format!("packed linear layer failed: {e}"))?;
    Ok(if w.is_padded() {
        y.narrow(-1, 0, w.out)
    } else {
        y
    })
}

/// Whether the packed linear kernels of `layout` work here for weights of `kind`, checked once
/// per type and layout (oneDNN's need oneDNN, and 16-bit types need CPU support that not
/// every CPU has; the panels need AVX-512).
fn kernels_work(kind: Kind, layout: Layout) -> bool {
    static F32: OnceLock<bool> = OnceLock::new();
    static F32_PANELS: OnceLock<bool> = OnceLock::new();
    static BF16: OnceLock<bool> = OnceLock::new();
    static F16: OnceLock<bool> = OnceLock::new();
    let cell = match (kind, layout) {
        (Kind::Float, Layout::Onednn) => &F32,
        (Kind::Float, Layout::Panels) => &F32_PANELS,
        (Kind::BFloat16, Layout::Onednn) => &BF16,
        (Kind::Half, Layout::Onednn) => &F16,
        _ => return false,
    };
    *cell.get_or_init(|| {
        let check = || -> Result<(), String> {
            let w = Tensor::ones([4, 8], (kind, Device::Cpu));
            let x = Tensor::ones([2, 8], (kind, Device::Cpu));
            let y = tch::no_grad(|| try_linear(&x, &repack_as(&w, 2, layout)?))?;
            if y.size() == [2, 4]
                && y.to_kind(Kind::Float).allclose(
                    &Tensor::full([2, 4], 8.0, (Kind::Float, Device::Cpu)),
                    1e-3,
                    1e-3,
                    false,
                )
            {
                Ok(())
            } else {
                Err("packed linear layer gave a wrong result".into())
            }
        };
        match check() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("decoding {kind:?} weights without packing them ({layout:?}): {e}");
                false
            }
        }
    })
}

/// The row order of [`super::llama::pair_halves`] as an index tensor beside `w`.
fn pairs(w: &Tensor, heads: i64, head_dim: i64) -> Tensor {
    Tensor::from_slice(&super::llama::pair_halves(heads, head_dim)).to_device(w.device())
}

/// One block's projections, packed: q/k/v fused, o, gate/up fused, down.
pub(super) struct PackedBlock {
    pub qkv: PackedWeight,
    /// The q/k/v biases in the packed rows' order, when the model has them (Qwen2).
    pub qkv_bias: Option<Tensor>,
    /// Qwen3's q and k norm weights, in the paired order of a head's dimensions.
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub o: PackedWeight,
    pub gate_up: PackedWeight,
    pub down: PackedWeight,
}

/// A model's weight matrices repacked for decoding (see the module docs).
pub struct Packed {
    pub(super) blocks: Vec<PackedBlock>,
    pub(super) lm_head: PackedWeight,
}

impl Llama {
    /// The weights repacked for decoding batches of about `rows` rows, in the layout of
    /// [`layout_for`] (panels as [`Llama::panel_products`] allows), or `None` where that does
    /// not apply: off the CPU (CUDA has no per-call repacking to save) or without the kernels.
    pub fn pack(&self, rows: i64) -> Option<Packed> {
        self.pack_as(rows, layout_for(self.kind(), self.panel_products))
    }

    /// [`Llama::pack`] in a given layout.
    pub fn pack_as(&self, rows: i64, layout: Layout) -> Option<Packed> {
        if self.device() != Device::Cpu || !kernels_work(self.kind(), layout) {
            return None;
        }
        let repack = |w: &Tensor, rows: i64| repack_as(w, rows, layout);
        let packed = tch::no_grad(|| -> Result<Packed, String> {
            let blocks = self
                .blocks
                .iter()
                .map(|b| {
                    // q and k rows paired for the complex-product rotary embeddings.
                    let (q, k) = (&b.attn.q.ws, &b.attn.k.ws);
                    let q = q.index_select(0, &pairs(q, b.attn.heads, b.attn.head_dim));
                    let k = k.index_select(0, &pairs(k, b.attn.kv_heads, b.attn.head_dim));
                    let qkv = Tensor::cat(&[&q, &k, &b.attn.v.ws], 0);
                    let qkv_bias = match (&b.attn.q.bs, &b.attn.k.bs, &b.attn.v.bs) {
                        (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(
                            &[
                                bq.index_select(0, &pairs(bq, b.attn.heads, b.attn.head_dim)),
                                bk.index_select(0, &pairs(bk, b.attn.kv_heads, b.attn.head_dim)),
                                bv.shallow_clone(),
                            ],
                            0,
                        )),
                        _ => None,
                    };
                    let qk_norm = b.attn.qk_norm.as_ref().map(|(qn, kn)| {
                        let order = pairs(&qn.weight, 1, b.attn.head_dim);
                        (
                            qn.weight.index_select(0, &order),
                            kn.weight.index_select(0, &order),
                        )
                    });
                    let gate_up = Tensor::cat(&[&b.mlp.gate.ws, &b.mlp.up.ws], 0);
                    Ok(PackedBlock {
                        qkv: repack(&qkv, rows)?,
                        qkv_bias,
                        qk_norm,
                        o: repack(&b.attn.o.ws, rows)?,
                        gate_up: repack(&gate_up, rows)?,
                        down: repack(&b.mlp.down.ws, rows)?,
                    })
                })
                .collect::<Result<_, String>>()?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            Ok(Packed {
                blocks,
                // Not padded: the output layer's product (49152 wide on SmolLM2) ran no
                // faster padded, and its logits would need a copy.
                lm_head: repack_with(head, rows, layout, false)?,
            })
        });
        match packed {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("decoding without packed weights: {e}");
                None
            }
        }
    }
}
