//! Micro-batched SIP updates (`train.micro_batch`). Log-probs (and the next-token loss) are
//! first computed without a graph, micro-batch by micro-batch; the objective's loss is
//! differentiated with respect to those values (leaves); then each micro-batch's forward pass
//! is run again with its graph and backpropagated with its part of that gradient. The parameter
//! gradient is that of one pass over everything, for the activation memory of one micro-batch.

use crate::model::{autocast, Llama};
use crate::sample::continuation_logprobs;
use sipt_experiment::config::Dtype;
use tch::{Device, Kind, Tensor};

/// `(start, len)` of consecutive spans of at most `size` of `n` items.
fn spans(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(size).map(move |i| (i, size.min(n - i)))
}

/// A forward pass to run again with its graph once its output's gradient is known.
enum Replay {
    /// Summed log-probs of continuations given prefixes.
    Sequences {
        pre: Vec<Vec<u32>>,
        cont: Vec<Vec<u32>>,
        leaf: Tensor,
    },
    /// The mean next-token loss over the rows of a batch.
    Ntp { batch: Tensor, leaf: Tensor },
}

/// One update's forward passes; with `size` 0 (or few enough items) they are ordinary passes.
pub(super) struct Micro {
    size: usize,
    device: Device,
    dtype: Dtype,
    replays: Vec<Replay>,
}

impl Micro {
    pub fn new(size: usize, device: Device, dtype: Dtype) -> Self {
        Micro {
            size,
            device,
            dtype,
            replays: Vec::new(),
        }
    }

    fn split(&self, n: usize) -> bool {
        self.size > 0 && n > self.size
    }

    /// Summed log-probs of `cont` given `pre` for rows `span`, in f32.
    fn sequences_part(
        &self,
        model: &Llama,
        pre: &[&[u32]],
        cont: &[&[u32]],
        (i, n): (usize, usize),
    ) -> (Tensor, Tensor) {
        let (lp, count) = autocast(self.device, self.dtype, || {
            continuation_logprobs(model, &pre[i..i + n], &cont[i..i + n])
        });
        (lp.to_kind(Kind::Float), count)
    }

    /// The next-token loss of rows `span`, weighted by their share of `rows`.
    fn ntp_part(&self, model: &Llama, batch: &Tensor, (i, n): (usize, usize)) -> Tensor {
        let rows = batch.size()[0] as f64;
        let part = autocast(self.device, self.dtype, || {
            model.ntp_loss(&batch.narrow(0, i as i64, n as i64))
        });
        part.to_kind(Kind::Float) * (n as f64 / rows)
    }

    /// Summed log-probs and token counts of continuations given prefixes. When split into
    /// micro-batches, the log-probs are a leaf whose gradient [`Micro::backward`] carries into
    /// the model, or (with `differentiable` false, e.g. for the reference) plain values.
    pub fn logprobs(
        &mut self,
        model: &Llama,
        pre: &[&[u32]],
        cont: &[&[u32]],
        differentiable: bool,
    ) -> (Tensor, Tensor) {
        if !self.split(pre.len()) {
            return autocast(self.device, self.dtype, || {
                continuation_logprobs(model, pre, cont)
            });
        }
        let (lp, count) = tch::no_grad(|| {
            let parts: Vec<(Tensor, Tensor)> = spans(pre.len(), self.size)
                .map(|span| self.sequences_part(model, pre, cont, span))
                .collect();
            let lps: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
            let counts: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
            (Tensor::cat(&lps, 0), Tensor::cat(&counts, 0))
        });
        if !differentiable {
            return (lp, count);
        }
        let leaf = lp.set_requires_grad(true);
        self.replays.push(Replay::Sequences {
            pre: pre.iter().map(|x| x.to_vec()).collect(),
            cont: cont.iter().map(|x| x.to_vec()).collect(),
            leaf: leaf.shallow_clone(),
        });
        (leaf, count)
    }

    /// The mean next-token loss of `batch (rows, T+1)`.
    pub fn ntp(&mut self, model: &Llama, batch: Tensor) -> Tensor {
        let rows = batch.size()[0] as usize;
        if !self.split(rows) {
            return autocast(self.device, self.dtype, || model.ntp_loss(&batch));
        }
        let value = tch::no_grad(|| {
            spans(rows, self.size)
                .map(|span| self.ntp_part(model, &batch, span))
                .fold(Tensor::zeros([], (Kind::Float, self.device)), |a, b| a + b)
        });
        let leaf = value.set_requires_grad(true);
        self.replays.push(Replay::Ntp {
            batch,
            leaf: leaf.shallow_clone(),
        });
        leaf
    }

    /// After the loss's backward pass: replay every split forward pass with its graph and
    /// backpropagate its leaf's gradient into the model's parameters.
    pub fn backward(&self, model: &Llama) {
        for replay in &self.replays {
            match replay {
                Replay::Sequences { pre, cont, leaf } => {
                    let grad = leaf.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let pre: Vec<&[u32]> = pre.iter().map(Vec::as_slice).collect();
                    let cont: Vec<&[u32]> = cont.iter().map(Vec::as_slice).collect();
                    for span in spans(pre.len(), self.size) {
                        let (lp, _) = self.sequences_part(model, &pre, &cont, span);
                        let g = grad.narrow(0, span.0 as i64, span.1 as i64);
                        (lp * g).sum(Kind::Float).backward();
                    }
                }
                Replay::Ntp { batch, leaf } => {
                    let grad = leaf.grad();
                    if !grad.defined() {
                        continue;
                    }
                    for span in spans(batch.size()[0] as usize, self.size) {
                        (self.ntp_part(model, batch, span) * &grad).backward();
                    }
                }
            }
        }
    }
}
