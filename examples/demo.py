"""nnsight_pure in one page: trace a model built in code, read, write, patch, draw.

Run it with ``./scripts/demo.sh`` (which sets up ``.venv`` first). Every
result is checked against the same computation done with plain torch hooks.
The picture of the patching trace goes to ``out/patching.png`` (or, without
Graphviz's ``dot`` program, its DOT text to ``out/patching.dot``).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict

import torch

import nnsight_pure as nnsight
from nnsight_pure.serialize import digest


class MLP(torch.nn.Sequential):
    """Linear -> ReLU -> Linear (attributes typed for mypy)."""

    layer1: torch.nn.Linear
    act: torch.nn.ReLU
    layer2: torch.nn.Linear


def build_model() -> MLP:
    torch.manual_seed(423)
    net = MLP(
        OrderedDict(
            [
                ("layer1", torch.nn.Linear(5, 10)),
                ("act", torch.nn.ReLU()),
                ("layer2", torch.nn.Linear(10, 2)),
            ]
        )
    )
    net.requires_grad_(False)
    return net


def main() -> None:
    net = build_model()
    model = nnsight.NNsight(net)
    print(model, end="\n\n")

    clean, corrupt = torch.rand(1, 5), torch.rand(1, 5)

    # 1. Trace: read activations, save them.
    with model.trace(clean) as tracer:
        hidden = model.layer1.output.save()
        logits = model.output.save()
    print("The graph the trace recorded:")
    print(tracer.graph, end="\n\n")
    assert torch.equal(hidden.value, net.layer1(clean))
    assert torch.equal(logits.value, net(clean))
    print("layer1 output:", hidden.value)
    print("logits:       ", logits.value, end="\n\n")

    # 2. Set: ablate half of layer1's units, in place, and see the logits move.
    with model.trace(clean):
        model.layer1.output[:, :5] = 0
        ablated = model.output.save()
    expected = net.layer2(net.act(torch.cat([torch.zeros(1, 5), net.layer1(clean)[:, 5:]], dim=1)))
    assert torch.equal(ablated.value, expected)
    print("logits with layer1[:, :5] = 0:", ablated.value)

    # ... or replace a whole value through the setter.
    with model.trace(clean):
        model.layer1.output = model.layer1.output * 2
        doubled = model.output.save()
    assert torch.equal(doubled.value, net.layer2(net.act(net.layer1(clean) * 2)))
    print("logits with layer1 doubled:   ", doubled.value, end="\n\n")

    # 3. Cross-invoke patching: two inputs in one batch; the corrupt run gets
    #    the clean run's layer1 activation (activation patching).
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_hidden = model.layer1.output
            clean_logits = model.output.save()
        with tracer.invoke(corrupt):
            corrupt_hidden = model.layer1.output.clone().save()
            model.layer1.output = clean_hidden
            patched_logits = model.output.save()
    assert torch.allclose(patched_logits.value, clean_logits.value)
    assert torch.allclose(corrupt_hidden.value, net.layer1(corrupt))
    print("clean logits:   ", clean_logits.value)
    print("patched logits: ", patched_logits.value, "(corrupt input, clean layer1)")
    print("corrupt logits: ", net(corrupt), end="\n\n")

    # 4. Draw the patching trace's graph (the seed's .vis feature).
    picture = "png" if shutil.which("dot") else "dot"
    written = tracer.vis(title="patching", path="out", format=picture)
    print("picture of the patching graph:", written)
    if picture == "dot":
        print("(Graphviz's `dot` is not installed, so this is the DOT text; apt-get install graphviz)")

    # 5. Saved values behave like their tensors after the trace.
    print("hidden.sum() + 1 =", (hidden.sum() + 1).item(), end="\n\n")

    # 6. Graphs as data: build the ablation once, replay it on new inputs
    #    without tracing again, and store it as JSON.
    def ablate(m: nnsight.NNsight) -> dict[str, nnsight.Proxy]:
        m.layer1.output[:, :5] = 0
        return {"logits": m.output}

    graph = nnsight.trace(model, ablate)
    for batch in (clean, corrupt, torch.rand(3, 5)):
        replayed = nnsight.run(model, graph, batch)["logits"]
        kept = net.layer1(batch)[:, 5:]
        assert torch.equal(replayed, net.layer2(net.act(torch.cat([torch.zeros(len(batch), 5), kept], dim=1))))
    assert nnsight.from_json(nnsight.to_json(graph)) == graph
    print("ablation graph, replayed on 3 batches; its digest:", digest(graph)[:16])
    print("\nAll results match plain torch.")


if __name__ == "__main__":
    main()
