"""The `.vis()` example of nnsight 0.4's release notes, verbatim but for the import.

Writes four pictures into intervention-graphs/visual-example/ (run it from a
scratch folder). In nnsight 0.4 `.vis()` had to be called inside the session;
here it may also be called after it.
"""

from collections import OrderedDict

import torch

from nnsight_pure import NNsight

input_size = 5
hidden_dims = 10
output_size = 2

torch.manual_seed(423)

net = torch.nn.Sequential(
    OrderedDict(
        [
            ("layer1", torch.nn.Linear(input_size, hidden_dims)),
            ("layer2", torch.nn.Linear(hidden_dims, output_size)),
        ]
    )
).requires_grad_(False)

input = torch.rand((1, input_size))
input2 = torch.rand((1, input_size))

model = NNsight(net)

with model.session() as sesh:
    with model.trace(input) as tracer_1:
        l1_out_t1 = model.layer1.output.save()
        l1_out_t1_cp = model.layer1.output.clone().save()
        model.layer1.output.stop()

    with sesh.iter([0, 1, 2]) as (item, iterator):
        with model.trace(input2) as tracer_2:
            l1_out_t2 = model.layer1.output.save()
            l1_out_t1_cp[:, item] = l1_out_t2[:, item] + l1_out_t1[:, item]

    sesh.vis(title="session", path="intervention-graphs/visual-example")
    tracer_1.vis(title="tracer_1", path="intervention-graphs/visual-example")
    tracer_2.vis(title="tracer_2", path="intervention-graphs/visual-example")
    iterator.vis(title="iterator", path="intervention-graphs/visual-example")

print("Tracer_1 L1_Out: ", l1_out_t1)
print("Tracer_1 L1_Out Copy: ", l1_out_t1_cp)
print("Tracer_2 L1_Out: ", l1_out_t2)
