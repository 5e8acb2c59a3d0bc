//! Fused CPU kernels for the elementwise layers of a Llama block (`core/cpp/fused_layers.cpp`):
//! RMSNorm, SwiGLU and rotate-half rotary embeddings, each one pass over memory forward and one
//! backward, with autograd nodes of their own. libtorch eager runs each as a chain of separate
//! passes with a fresh buffer per pass (RMSNorm: five forward, about ten backward), which is
//! where torch.compile's lead over eager training on a CPU comes from.
//!
//! Forward only, also: the chunked loss's softmax, the attention of a decode step, the
//! sampler's pick of the next token ([`sample_pick`], which reads bf16 logits as well), and for
//! inference in f32 or bf16 ([`infers`]) each residual add with the RMSNorm after it
//! ([`add_rms_norm`]) and SwiGLU.
//!
//! They take f32 tensors on a CPU ([`applies`]), or bf16 ones without gradients; everywhere
//! else (CUDA, bf16 training) the model keeps libtorch's own ops. [`super::Llama::fused_layers`] turns them off, for tests and for
//! measuring the two side by side.

use super::llama::DecodeKeys;
use super::packed::call;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn sipt_fused_rms_norm(
        input: *const C_tensor,
        weight: *const C_tensor,
        eps: f64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_swiglu(
        gate: *const C_tensor,
        up: *const C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_xent_chunk(
        logits: *const C_tensor,
        targets: *const C_tensor,
        row_weights: *const C_tensor,
        scale: f64,
        grad: std::ffi::c_int,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_decode_attention(
        q: *const C_tensor,
        prefix_k: *const C_tensor,
        prefix_v: *const C_tensor,
        prefix_mask: *const C_tensor,
        own_k: *const C_tensor,
        own_v: *const C_tensor,
        band: *const C_tensor,
        prefix_kt: *const C_tensor,
        per: i64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_sample_pick(
        logits: *const C_tensor,
        draws: *const C_tensor,
        temperature: f64,
        tokens: *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_add_rms_norm(
        x: *mut C_tensor,
        residual: *const C_tensor,
        weight: *const C_tensor,
        eps: f64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn sipt_fused_grad_enabled() -> std::ffi::c_int;
    fn sipt_fused_qkv_pairs_into_cache(
        qkv: *const C_tensor,
        turn: *const C_tensor,
        cache_k: *mut C_tensor,
        cache_v: *mut C_tensor,
        start: i64,
        heads: i64,
        kv_heads: i64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    #[cfg(test)]
    fn sipt_fused_parallel_threads(tasks: i64) -> i64;
    fn sipt_fused_rope(
        input: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// Whether the fused kernels take these tensors: all f32, all on a CPU.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device() == Device::Cpu && t.kind() == Kind::Float)
}

/// Whether the inference kernels ([`add_rms_norm`], and [`swiglu`] in bf16) take these tensors:
/// all f32 or all bf16, on a CPU, with gradients off (under `no_grad`, as decoding runs).
pub fn infers(tensors: &[&Tensor]) -> bool {
    // SAFETY: reads libtorch's thread-local grad mode.
    let grad = unsafe { sipt_fused_grad_enabled() } != 0;
    let kind = tensors.first().map(|t| t.kind());
    !grad
        && matches!(kind, Some(Kind::Float) | Some(Kind::BFloat16))
        && tensors
            .iter()
            .all(|t| t.device() == Device::Cpu && Some(t.kind()) == kind)
}

/// Whether [`qkv_pairs_into_cache`] takes a step's product `qkv` into a cache whose keys are
/// `cache_k`: gradients off, on a CPU, `qkv` f32 or bf16, the cache f32.
pub fn caches_pairs(qkv: &Tensor, cache_k: &Tensor) -> bool {
    // SAFETY: reads libtorch's thread-local grad mode.
    let grad = unsafe { sipt_fused_grad_enabled() } != 0;
    !grad
        && qkv.device() == Device::Cpu
        && matches!(qkv.kind(), Kind::Float | Kind::BFloat16)
        && cache_k.device() == Device::Cpu
        && cache_k.kind() == Kind::Float
}

/// The kernels check only what the model guarantees (types, matching shapes); a failure is a
/// bug in the caller, reported the way tch reports a failed libtorch op.
fn expect(what: &str, result: Result<Tensor, String>) -> Tensor {
    result.unwrap_or_else(|e| panic!("fused {what} failed: {e}"))
}

/// RMSNorm of `xs (..., d)` by `weight (d,)`: `xs / sqrt(mean(xs²) + eps) · weight`.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    // SAFETY: both handles stay alive for the call; the result is a fresh tensor we own.
    expect(
        "RMSNorm",
        call(|err, len| unsafe {
            sipt_fused_rms_norm(xs.as_ptr(), weight.as_ptr(), eps, err, len)
        }),
    )
}

/// Inference only ([`infers`]): `x ← x + residual` in place when a residual is given, then
/// the RMSNorm of `x (..., d)` by `weight (d,)`, in f32 or bf16. The arithmetic is f32 and rounds
/// to the activations' type where the plain path's ops do (the sum, the normalised `x`, its
/// product with the weight), so that a bf16 model decodes as with libtorch's ops. `x` must be
/// contiguous when a residual is added into it.
pub fn add_rms_norm(
    x: &mut Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
) -> Tensor {
    let residual = residual.map_or(std::ptr::null(), |r| r.as_ptr());
    // SAFETY: every handle stays alive for the call; `x` is borrowed mutably for the in-place
    // add; the result is a fresh tensor we own.
    expect(
        "RMSNorm",
        call(|err, len| unsafe {
            sipt_fused_add_rms_norm(x.as_mut_ptr(), residual, weight.as_ptr(), eps, err, len)
        }),
    )
}

/// Inference only ([`caches_pairs`]): a cached step's queries, keys and values from the packed
/// product `qkv (B, T, (heads + 2·kv_heads)·D)` in the paired layout (each rotated pair of
/// dimensions side by side), rotated by `turn` (complex f32, `B · T · D/2`) in f32 as the
/// plain path's complex product rotates them. The keys and values go straight into `cache_k`,
/// `cache_v (B, kv_heads, capacity, D)` at positions `start ..`; returns the queries
/// `(B, T, heads, D)` in f32.
pub fn qkv_pairs_into_cache(
    qkv: &Tensor,
    turn: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    start: i64,
    heads: i64,
    kv_heads: i64,
) -> Tensor {
    // SAFETY: every handle stays alive for the call; the caches are borrowed mutably for the
    // writes; the result is a fresh tensor we own.
    expect(
        "rotation into the cache",
        call(|err, len| unsafe {
            sipt_fused_qkv_pairs_into_cache(
                qkv.as_ptr(),
                turn.as_ptr(),
                cache_k.as_mut_ptr(),
                cache_v.as_mut_ptr(),
                start,
                heads,
                kv_heads,
                err,
                len,
            )
        }),
    )
}

/// `silu(gate) · up`, both `(..., n)`; rows may be strided (the halves of one product). f32, or
/// bf16 where [`infers`] holds (rounded where the plain path's two ops round).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Tensor {
    // SAFETY: as in `rms_norm`.
    expect(
        "SwiGLU",
        call(|err, len| unsafe { sipt_fused_swiglu(gate.as_ptr(), up.as_ptr(), err, len) }),
    )
}

/// Rotate-half rotary embeddings of `xs (N, H, D)` (N positions of H heads) by `cos` and
/// `sin (N, D)`: `xs · cos + rotate_half(xs) · sin` per head.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    // SAFETY: as in `rms_norm`.
    expect(
        "rotary embeddings",
        call(|err, len| unsafe {
            sipt_fused_rope(xs.as_ptr(), cos.as_ptr(), sin.as_ptr(), err, len)
        }),
    )
}

/// `llama::shared_prefix_attention` in one kernel, with the same result: the
/// attention of one new position per row, `q (R, H, 1, D)`, over its prefix and its own cached
/// positions. One task per row and KV head reads its keys and values once for all the heads of
/// its group; given the prefix's keys transposed (`prefix_t`, [`transposed_keys`]), one task per
/// block of up to four rows of a prefix and KV head reads the prefix once for all their heads,
/// with no sums across vector lanes. Masks are bool, true where seen. A decode step without a
/// shared prefix passes each row's cache as a prefix of its own (`per` 1, the padding mask per
/// row, `own` empty).
pub(super) fn decode_attention(q: &Tensor, keys: &DecodeKeys) -> Tensor {
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: every handle stays alive for the call (the optional ones are null or borrowed);
    // the result is a fresh tensor we own.
    expect(
        "decode attention",
        call(|err, len| unsafe {
            sipt_fused_decode_attention(
                q.as_ptr(),
                keys.prefix.0.as_ptr(),
                keys.prefix.1.as_ptr(),
                opt(keys.prefix_mask),
                keys.own.0.as_ptr(),
                keys.own.1.as_ptr(),
                opt(keys.band),
                opt(keys.prefix_t),
                keys.per,
                err,
                len,
            )
        }),
    )
}

/// A shared prefix's keys `(P, KV, Lp, D)` as [`decode_attention`] reads them fastest,
/// transposed to `(P, KV, D, Lt)` with `Lt` the next multiple of 16 and zeros past `Lp`; `None`
/// where the kernel does not apply (not f32 on a CPU).
pub(super) fn transposed_keys(keys: &Tensor) -> Option<Tensor> {
    let (p, kv, lp, d) = keys.size4().ok()?;
    if !applies(&[keys]) {
        return None;
    }
    let padded = Tensor::zeros([p, kv, d, (lp + 15) / 16 * 16], (Kind::Float, Device::Cpu));
    padded.narrow(3, 0, lp).copy_(&keys.transpose(2, 3));
    Some(padded)
}

/// The NLL `(n,)` of each row of `logits (n, V)` (contiguous f32 on a CPU) at `targets (n,)`:
/// `logsumexp(row) − row[target]`. With `grad`, `logits` is then overwritten by the gradient of
/// `Σ w · NLL` for them, `(softmax − one-hot) · w`, with `w` the row's entry of `row_weights`
/// (f32) or `scale` for every row.
pub fn cross_entropy_rows(
    logits: &mut Tensor,
    targets: &Tensor,
    row_weights: Option<&Tensor>,
    scale: f64,
    grad: bool,
) -> Tensor {
    expect(
        "cross-entropy",
        try_cross_entropy_rows(logits, targets, row_weights, scale, grad),
    )
}

fn try_cross_entropy_rows(
    logits: &mut Tensor,
    targets: &Tensor,
    row_weights: Option<&Tensor>,
    scale: f64,
    grad: bool,
) -> Result<Tensor, String> {
    let weights = row_weights.map_or(std::ptr::null(), |w| w.as_ptr());
    // SAFETY: every handle stays alive for the call (`weights` is null or borrowed from
    // `row_weights`); the kernel writes only into `logits`, which we hold mutably.
    call(|err, len| unsafe {
        sipt_fused_xent_chunk(
            logits.as_ptr(),
            targets.as_ptr(),
            weights,
            scale,
            grad.into(),
            err,
            len,
        )
    })
}

/// The next token of each row of `logits (N, V)` (contiguous, f32 or bf16, on a CPU) and its
/// log-probability at temperature 1, both `(N,)`: the first maximum when `temperature` ≤ 0,
/// else inverse-CDF sampling at `temperature` with one uniform draw in [0, 1) per row.
pub fn sample_pick(logits: &Tensor, draws: Option<&[f32]>, temperature: f64) -> (Tensor, Tensor) {
    let rows = logits.size().first().copied().unwrap_or(0);
    let mut tokens = Tensor::empty([rows], (Kind::Int64, Device::Cpu));
    let draws = draws.map(Tensor::from_slice);
    let opt = draws.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: every handle stays alive for the call (`opt` is null or borrowed from `draws`);
    // the kernel writes only into `tokens`, a fresh tensor of `rows` int64s that we own.
    let logp = expect(
        "sampling",
        call(|err, len| unsafe {
            sipt_fused_sample_pick(
                logits.as_ptr(),
                opt,
                temperature,
                tokens.as_mut_ptr(),
                err,
                len,
            )
        }),
    );
    (tokens, logp)
}

#[cfg(test)]
mod tests {
    //! Each kernel against the same layer written with libtorch's own ops, in value and in
    //! every gradient, on sizes that are not whole numbers of the kernels' 16-wide steps.
    use super::*;

    fn leaf(shape: &[i64], scale: f64) -> Tensor {
        (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale).set_requires_grad(true)
    }

    #[test]
    fn the_kernels_loops_run_on_libtorchs_threads() {
        // Without OpenMP in the shims' build, `at::parallel_for` would run every kernel on
        // the calling thread alone while libtorch's own ops use all of them.
        let threads = i64::from(tch::get_num_threads()).min(64);
        // SAFETY: a plain call with no pointers.
        assert_eq!(unsafe { sipt_fused_parallel_threads(64) }, threads);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Gradients of `Σ out · upstream` for `inputs`, zeroed after.
    fn grads(out: &Tensor, upstream: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
        (out * upstream).sum(Kind::Float).backward();
        inputs
            .iter()
            .map(|t| {
                let mut t = (*t).shallow_clone();
                let g = t.grad().copy();
                t.zero_grad();
                g
            })
            .collect()
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
        let scale = b.abs().max().double_value(&[]).max(1.0);
        let d = max_diff(a, b);
        assert!(d <= tol * scale, "{what}: differs by {d} (of {scale})");
    }

    /// `ours` against `expected` in value, then in the gradients of `inputs` under `upstream`.
    fn assert_same(
        what: &str,
        ours: &Tensor,
        expected: &Tensor,
        upstream: &Tensor,
        inputs: &[&Tensor],
        tol: f64,
    ) {
        assert_close(what, ours, expected, tol);
        let want = grads(expected, upstream, inputs);
        let got = grads(ours, upstream, inputs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{what}: d input {i}"), g, w, tol);
        }
    }

    #[test]
    fn rms_norm_matches_libtorch_forward_and_backward() {
        tch::manual_seed(1);
        let x = leaf(&[3, 5, 37], 2.0);
        let w = leaf(&[37], 1.0);
        let up = Tensor::randn([3, 5, 37], (Kind::Float, Device::Cpu));
        let plain = |x: &Tensor| {
            (x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-5).rsqrt()) * &w
        };
        // Dense, and a transposed (non-contiguous) input.
        for transposed in [false, true] {
            let input = |x: &Tensor| match transposed {
                true => x.transpose(0, 1).contiguous().transpose(0, 1),
                false => x.shallow_clone(),
            };
            let expected = plain(&input(&x));
            let ours = rms_norm(&input(&x), &w, 1e-5);
            assert_same("RMSNorm", &ours, &expected, &up, &[&x, &w], 1e-5);
        }
        // Without gradients: the value only, and no graph.
        let quiet = tch::no_grad(|| rms_norm(&x, &w, 1e-5));
        assert!(!quiet.requires_grad());
        assert_close("RMSNorm, no grad", &quiet, &plain(&x).detach(), 1e-5);
    }

    #[test]
    fn swiglu_matches_libtorch_on_strided_halves_and_large_inputs() {
        tch::manual_seed(2);
        // The halves of one product, as the packed weights give them: rows strided by 2 × 29.
        let gate_up = leaf(&[2, 3, 58], 3.0);
        // Values where e^x under- and overflows f32 on the way.
        let extremes = Tensor::from_slice(&[-120.0f32, -90.0, -30.0, 0.0, 30.0, 90.0, 120.0])
            .view([1, 7])
            .set_requires_grad(true);
        let up = Tensor::randn([2, 3, 29], (Kind::Float, Device::Cpu));
        let (g, u) = (gate_up.narrow(-1, 0, 29), gate_up.narrow(-1, 29, 29));
        let (expected, ours) = (g.silu() * &u, swiglu(&g, &u));
        assert_same("SwiGLU", &ours, &expected, &up, &[&gate_up], 1e-5);
        let ones = extremes.ones_like();
        let (expected, ours) = (extremes.silu() * &ones, swiglu(&extremes, &ones));
        assert_same(
            "SwiGLU at the extremes",
            &ours,
            &expected,
            &ones,
            &[&extremes],
            1e-6,
        );
    }

    /// The plain path's RMSNorm of a model in `x`'s type (as `llama::rms_norm` writes it with
    /// libtorch's ops): normalised in f32, rounded back, then times the weight.
    fn plain_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let f = x.to_kind(Kind::Float);
        let rms = (f.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + eps).rsqrt();
        (f * rms).to_kind(x.kind()) * w
    }

    /// The largest difference of `a` from `b` in units of `b`'s rounding step (bf16: 8 bits of
    /// mantissa), element by element.
    fn ulps(a: &Tensor, b: &Tensor, bits: i32) -> f64 {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let step = (b.abs() * 2f64.powi(-bits)).clamp_min(1e-30);
        ((a - &b).abs() / step).max().double_value(&[])
    }

    /// bf16 `ours` against the plain ops' `expected`: at most 2 steps of bf16 anywhere, and
    /// bit for bit in all but a few elements (where the plain ops' other order of summing
    /// tips a rounding), so that each rounding the plain ops make is made here too.
    fn assert_rounds_alike(what: &str, ours: &Tensor, expected: &Tensor) {
        let worst = ulps(ours, expected, 8);
        let differ = ours
            .ne_tensor(expected)
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        let differ = differ.double_value(&[]);
        assert!(
            worst <= 2.0 && differ <= 0.02,
            "{what}: {worst} steps, {differ} differ"
        );
    }

    #[test]
    fn inference_rms_norm_adds_the_residual_in_place_and_rounds_as_the_plain_ops() {
        tch::manual_seed(6);
        for kind in [Kind::Float, Kind::BFloat16] {
            let randn = |shape: &[i64], scale: f64| {
                (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale).to_kind(kind)
            };
            // 37 wide: not a whole number of the kernels' 16-wide steps.
            let (x0, h, w) = (
                randn(&[3, 5, 37], 2.0),
                randn(&[3, 5, 37], 1.0),
                randn(&[37], 1.0),
            );
            tch::no_grad(|| {
                assert!(infers(&[&x0, &h, &w]), "{kind:?}");
                let sum = &x0 + &h;
                let mut x = x0.copy();
                let ours = add_rms_norm(&mut x, Some(&h), &w, 1e-5);
                // The sum is rounded once, as libtorch's add rounds it.
                assert!(x.equal(&sum), "{kind:?}: the residual add");
                let expected = plain_rms_norm(&sum, &w, 1e-5);
                // Without a residual, on a transposed (non-contiguous) input, left unchanged.
                let t = x0.transpose(0, 1);
                let alone = add_rms_norm(&mut t.shallow_clone(), None, &w, 1e-5);
                assert!(t.equal(&x0.transpose(0, 1)), "{kind:?}: input changed");
                let expected_alone = plain_rms_norm(&t, &w, 1e-5);
                match kind {
                    Kind::Float => {
                        assert_close("add + RMSNorm", &ours, &expected, 1e-5);
                        assert_close("RMSNorm", &alone, &expected_alone, 1e-5);
                    }
                    // The plain ops sum the squares in another order: a rounding of the
                    // normalised x may fall the other way, by one step of bf16 (then a second
                    // rounding by the weight).
                    _ => {
                        assert_rounds_alike("bf16 add + RMSNorm", &ours, &expected);
                        assert_rounds_alike("bf16 RMSNorm", &alone, &expected_alone);
                    }
                }
            });
        }
    }

    #[test]
    fn inference_swiglu_takes_bf16_and_rounds_as_the_plain_ops() {
        tch::manual_seed(7);
        let gate_up =
            (Tensor::randn([2, 3, 58], (Kind::Float, Device::Cpu)) * 3.0).to_kind(Kind::BFloat16);
        let (g, u) = (gate_up.narrow(-1, 0, 29), gate_up.narrow(-1, 29, 29));
        tch::no_grad(|| {
            assert!(infers(&[&g, &u]));
            let ours = swiglu(&g, &u);
            assert_eq!(ours.kind(), Kind::BFloat16);
            assert_rounds_alike("bf16 SwiGLU", &ours, &(g.silu() * &u));
        });
    }

    #[test]
    fn the_inference_kernels_need_gradients_off() {
        let x = Tensor::ones([2, 4], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
        assert!(!infers(&[&x, &w]), "grad mode is on");
        assert!(tch::no_grad(|| infers(&[&x, &w])));
        assert!(!tch::no_grad(|| infers(&[&x, &w.to_kind(Kind::Float)])));
        // Called anyway where a gradient would flow: an error, not a silent wrong gradient.
        let leaf = x.to_kind(Kind::Float).set_requires_grad(true);
        let wf = w.to_kind(Kind::Float);
        let refused =
            std::panic::catch_unwind(|| add_rms_norm(&mut leaf.shallow_clone(), None, &wf, 1e-5));
        let message = refused
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("without gradients")),
            "{message:?}"
        );
    }

    #[test]
    fn paired_rotation_into_the_cache_matches_the_plain_ops() {
        tch::manual_seed(9);
        // 3 rows of 2 positions, 4 query heads and 2 key/value heads of 10 (5 pairs), written
        // at positions 3 and 4 of a cache of 7.
        let (b, t, heads, kv, d, start) = (3i64, 2i64, 4i64, 2i64, 10i64, 3i64);
        for kind in [Kind::Float, Kind::BFloat16] {
            let qkv = Tensor::randn([b, t, (heads + 2 * kv) * d], (Kind::Float, Device::Cpu))
                .to_kind(kind);
            let angles = Tensor::randn([b, t, 1, d / 2], (Kind::Float, Device::Cpu)) * 3.0;
            let turn = Tensor::polar(&angles.ones_like(), &angles);
            let blank = || Tensor::randn([b, kv, 7, d], (Kind::Float, Device::Cpu));
            let (mut ck, mut cv) = (blank(), blank());
            let (pk, pv) = (ck.copy(), cv.copy());
            tch::no_grad(|| {
                assert!(caches_pairs(&qkv, &ck));
                let q = qkv_pairs_into_cache(&qkv, &turn, &mut ck, &mut cv, start, heads, kv);
                // The plain path (`llama::Attention::forward` with packed weights).
                let qk = qkv
                    .narrow(-1, 0, (heads + kv) * d)
                    .to_kind(Kind::Float)
                    .view([b, t, heads + kv, d / 2, 2])
                    .view_as_complex()
                    * &turn;
                let qk = qk.view_as_real().view([b, t, heads + kv, d]);
                let v = qkv.narrow(-1, (heads + kv) * d, kv * d).view([b, t, kv, d]);
                pk.narrow(2, start, t)
                    .copy_(&qk.narrow(2, heads, kv).transpose(1, 2));
                pv.narrow(2, start, t).copy_(&v.transpose(1, 2));
                assert_eq!(q.size(), [b, t, heads, d]);
                assert_close(&format!("{kind:?} q"), &q, &qk.narrow(2, 0, heads), 1e-6);
                // The keys at the step's positions, and every other position left as it was.
                assert_close(&format!("{kind:?} k"), &ck, &pk, 1e-6);
                assert!(cv.equal(&pv), "{kind:?} v");
            });
        }
        // Not where a gradient could flow.
        let x = Tensor::zeros([1, 1, 40], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(!caches_pairs(
            &x,
            &Tensor::zeros([1], (Kind::Float, Device::Cpu))
        ));
    }

    #[test]
    fn rope_matches_rotate_half_on_strided_rows() {
        tch::manual_seed(3);
        // 6 positions of 5 heads of 10; the rotation takes heads 1..4 (rows strided by 50).
        let x = leaf(&[6, 5, 10], 1.0);
        let cos = Tensor::randn([6, 10], (Kind::Float, Device::Cpu));
        let sin = Tensor::randn([6, 10], (Kind::Float, Device::Cpu));
        let up = Tensor::randn([6, 3, 10], (Kind::Float, Device::Cpu));
        let part = x.narrow(1, 1, 3);
        let rotate_half =
            |t: &Tensor| Tensor::cat(&[&(-t.narrow(-1, 5, 5)), &t.narrow(-1, 0, 5)], -1);
        let expected = &part * cos.unsqueeze(1) + rotate_half(&part) * sin.unsqueeze(1);
        let ours = rope(&part, &cos, &sin);
        assert_same("rotary embeddings", &ours, &expected, &up, &[&x], 1e-6);
    }

    #[test]
    fn cross_entropy_rows_match_log_softmax_and_its_gradient() {
        tch::manual_seed(4);
        // 53 logits a row, some rows far from zero (e^x over- and underflows there).
        let logits = Tensor::randn([7, 53], (Kind::Float, Device::Cpu))
            * Tensor::from_slice(&[1.0f32, 5.0, 30.0, 200.0, 1.0, 0.1, 80.0]).unsqueeze(1);
        let targets = Tensor::from_slice(&[0i64, 52, 7, 3, 40, 11, 19]);
        let weights = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0, 1.5, 1.0, -0.25]);
        let logp = logits.log_softmax(-1, Kind::Float);
        let expected = -logp.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
        let softmax_minus_onehot = logp.exp() - targets.one_hot(53).to_kind(Kind::Float);
        // No gradient: the logits stay as they are.
        let mut kept = logits.copy();
        let nll = cross_entropy_rows(&mut kept, &targets, None, 1.0, false);
        assert_close("NLL", &nll, &expected, 1e-5);
        assert_eq!(
            max_diff(&kept, &logits),
            0.0,
            "the logits changed without a gradient"
        );
        // Per-row weights, then one scale for every row.
        let mut g = logits.copy();
        let nll = cross_entropy_rows(&mut g, &targets, Some(&weights), 1.0, true);
        assert_close("NLL with a gradient", &nll, &expected, 1e-5);
        assert_close(
            "d logits, row weights",
            &g,
            &(&softmax_minus_onehot * weights.unsqueeze(1)),
            1e-5,
        );
        let mut g = logits.copy();
        let _ = cross_entropy_rows(&mut g, &targets, None, 1.0 / 7.0, true);
        assert_close(
            "d logits, the mean",
            &g,
            &(&softmax_minus_onehot / 7.0),
            1e-5,
        );
        // A target outside the vocabulary is an error, not a read past the row.
        let mut g = logits.copy();
        let bad = Tensor::from_slice(&[0i64, 53, 7, 3, 40, 11, 19]);
        let err = try_cross_entropy_rows(&mut g, &bad, None, 1.0, true).unwrap_err();
        assert!(
            err.contains("targets in 0..53 for a vocabulary of 53"),
            "{err}"
        );
    }

    #[test]
    fn decode_attention_matches_the_ops_it_replaces() {
        use super::super::llama::shared_prefix_attention;
        let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        // (prefixes, rows per prefix, heads, KV heads, head size, prefix length, own length,
        // padding mask, sliding-window band): head sizes 64 and 32 run the kernel's 16-wide
        // blocks, 24 its scalar loops; lengths that are not whole blocks; grouped heads (3 per
        // KV head) and one per KV head.
        //
        // With the prefix's keys transposed, rows come in blocks of up to four (16 rows: four
        // blocks; 6: two of 3; 5: 3 and 2) and queries in register blocks of up to six (eight
        // heads a KV head: 6 and 2); prefix lengths of 37 and 20 pad their last block of 16.
        for (p, per, h, kv, d, lp, s, masked, banded) in [
            (1, 4, 6, 2, 64, 37, 5, true, false),
            (3, 2, 4, 4, 32, 16, 1, false, true),
            (2, 2, 2, 1, 24, 20, 19, true, true),
            (1, 16, 9, 3, 64, 256, 64, false, false),
            (2, 6, 8, 1, 64, 33, 0, true, true),
            (1, 5, 6, 3, 128, 70, 17, false, true),
        ] {
            let r = p * per;
            let q = randn(&[r, h, 1, d]);
            let prefix = (randn(&[p, kv, lp, d]), randn(&[p, kv, lp, d]));
            // The row's own keys and values as the cache holds them: the first `s` of more.
            let (ck, cv) = (randn(&[r, kv, s + 3, d]), randn(&[r, kv, s + 3, d]));
            let own = (ck.narrow(2, 0, s), cv.narrow(2, 0, s));
            let mask = masked.then(|| {
                let m = Tensor::rand([p, 1, 1, lp], (Kind::Float, Device::Cpu)).gt(0.3);
                // Left padding keeps at least the prefix's last position.
                let _ = m.narrow(3, lp - 1, 1).fill_(1);
                m
            });
            let band = banded.then(|| {
                let b = Tensor::rand([1, lp + s], (Kind::Float, Device::Cpu)).gt(0.4);
                let _ = b.narrow(1, lp + s - 1, 1).fill_(1);
                b
            });
            let mut keys = DecodeKeys {
                prefix: &prefix,
                prefix_t: None,
                own: &own,
                per,
                prefix_mask: mask.as_ref(),
                band: band.as_ref(),
            };
            let plain = shared_prefix_attention(&q, &keys);
            let fused = decode_attention(&q, &keys);
            assert_eq!(fused.size(), [r, h, 1, d]);
            assert_close(&format!("{p}x{per}, d {d}"), &fused, &plain, 1e-5);
            let transposed = transposed_keys(&prefix.0).expect("f32 on a CPU");
            keys.prefix_t = Some(&transposed);
            let fused = decode_attention(&q, &keys);
            assert_close(
                &format!("{p}x{per}, d {d}, transposed"),
                &fused,
                &plain,
                1e-5,
            );
        }
    }

    #[test]
    fn only_f32_on_a_cpu_applies() {
        let f = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2], (Kind::BFloat16, Device::Cpu));
        assert!(applies(&[&f, &f]));
        assert!(!applies(&[&f, &b]));
    }
}
