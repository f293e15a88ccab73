"""The op schemas of the ``labelsmooth`` namespace.

The compiled extension defines them in C++ (csrc/ops.cpp); the Python fallback defines them from here.
A test checks that both say the same thing.
"""

NAMESPACE = "labelsmooth"

# smoothing: 0 = PyTorch's convention (every class gets eps / K), 1 = eps / (K - 1) on the other classes only.
# softcap: None, or c > 0 to read every logit z as c * tanh(z / c). lse is differentiable (its gradient is
# the softmax), which is how z-loss and a returned lse get their gradients. target_mass: per row
# sum_c w_c t'_c for probability targets (saved for the backward), an empty tensor for class indices.
FORWARD_SCHEMA = (
    "ls_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, int smoothing, float? softcap, int reduction) -> (Tensor loss, Tensor lse, "
    "Tensor target_mass)"
)
BACKWARD_SCHEMA = (
    "ls_cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor target, Tensor? weight, "
    "Tensor lse, Tensor target_mass, int ignore_index, float label_smoothing, int smoothing, float? softcap, "
    "int reduction) -> Tensor"
)

SCHEMAS = (FORWARD_SCHEMA, BACKWARD_SCHEMA)
