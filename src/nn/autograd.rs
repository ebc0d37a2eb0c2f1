//! Gradients that kiln's fused ops hand back beside candle's graph, and the backward pass
//! that collects them.
//!
//! A candle custom op takes at most three tensors, and a fused transformer block needs up to a
//! dozen weights. Passing them as one `Tensor::cat` of flattened weights costs a copy in the
//! forward and, in candle's backward, a narrow and two accumulations per weight (`cat`'s and
//! `flatten`'s), each a fresh zero tensor plus an add on the thread driving the step while the
//! pool waits. Instead the fused ops ([`super::block`]) read their weights in place and
//! deposit each trainable weight's gradient here; [`backward`] runs candle's backward and adds
//! the deposits into the `GradStore` it returns, so the optimizer sees one store as before.
//!
//! candle runs every op's backward on the thread that called `Tensor::backward`, so the
//! deposits are kept per thread and [`backward`] clears them first: a backward that failed
//! half-way leaves nothing for the next one.

use std::cell::RefCell;

use candle_core::Tensor;
use candle_core::backprop::GradStore;

thread_local! {
    static DEPOSITS: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// Records `grad` as (a part of) the gradient of the variable `var`, for the [`backward`]
/// running on this thread.
pub(crate) fn deposit(var: &Tensor, grad: Tensor) {
    DEPOSITS.with(|d| d.borrow_mut().push((var.clone(), grad)));
}

/// An input for a fused op whose gradients go to [`deposit`]: a one-value tensor that is a
/// variable when `tracked`, so that candle tracks the op's output (and runs its backward) even
/// when none of its other inputs is tracked (the lowest trainable layer above frozen ones, an
/// embedding table). It never gets a gradient itself.
pub(crate) fn anchor(tracked: bool) -> candle_core::Result<Tensor> {
    let zero = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    Ok(if tracked {
        candle_core::Var::from_tensor(&zero)?.as_tensor().clone()
    } else {
        zero
    })
}

/// The gradients of `loss` with respect to every variable it depends on: candle's
/// `loss.backward()` plus what kiln's fused ops deposited on the way. Use this instead of
/// `Tensor::backward` wherever a model may run a fused block (every kiln model on the CPU).
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    DEPOSITS.with(|d| d.borrow_mut().clear());
    let grads = loss.backward();
    let deposits = DEPOSITS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    let mut grads = grads?;
    for (var, g) in deposits {
        let g = match grads.remove(&var) {
            Some(earlier) => (earlier + g)?,
            None => g,
        };
        grads.insert(&var, g);
    }
    Ok(grads)
}

/// [`backward`] as a method, for call chains: `loss.backprop()?`.
pub trait Backprop {
    /// See [`backward`].
    fn backprop(&self) -> candle_core::Result<GradStore>;
}

impl Backprop for Tensor {
    fn backprop(&self) -> candle_core::Result<GradStore> {
        backward(self)
    }
}
