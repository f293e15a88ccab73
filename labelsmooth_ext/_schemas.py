"""The op schemas of the ``labelsmooth`` namespace.

The compiled extension defines them in C++ (csrc/ops.cpp); the Python fallback defines them from here.
A test checks that both say the same thing.
"""

NAMESPACE = "labelsmooth"

FORWARD_SCHEMA = (
    "ls_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse)"
)
BACKWARD_SCHEMA = (
    "ls_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, int reduction) -> Tensor"
)

SCHEMAS = (FORWARD_SCHEMA, BACKWARD_SCHEMA)
