"""One process of a two-process pod (gloo), run by `test_train_loop.py`: the held-out loss of one
batch, placed as the training loop places it (`_global_batch`: process-local feature indices
offset to this process's pixels) and computed by the pod with the step's blocked feature gather,
and the embeddings of each process's rows, must equal what the processes compute alone on one
device from their own rows, pixels and local indices (the loss: their token-weighted mean). A
wrong offset, or blocks laid out in another order than the processes' pixels, gathers other
pictures' features and changes the embeddings (compared first, row by row) and the loss; nothing
else in a pod run would notice.

    python tests/pod_gather.py COORDINATOR PROCESS_ID DATASET
"""

import os
import sys

import jax
import numpy as np


def main(coordinator: str, process_id: int, dataset: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, 2, process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from unitoken_jax.configs import stages
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.unitoken import UniToken
    from unitoken_jax.train import loop
    from unitoken_jax.train.config import TrainConfig
    from unitoken_jax.train.evaluate import make_eval_loss
    from unitoken_jax.train.program import batch_shards, build_program, make_mesh

    c = stages.stage_config(2, "tiny")
    c.data.demo = False
    c.data.sources = (dataset,)
    c.data.num_threads = 1
    config = TrainConfig.from_config_dict(c)
    mesh = make_mesh(config.mesh)
    assert mesh.size == 2 and batch_shards(mesh) == 2, dict(mesh.shape)
    program = build_program(config, mesh)
    pipeline = loop._input_pipeline([dataset], config, mesh)
    it = pipeline.iterator()
    local = next(it)
    getattr(it, "close", lambda: None)()
    per_process = pipeline.config.max_images * pipeline.features_per_tile
    batch = loop._global_batch(local, program.batch_shardings, per_process, pipeline.config.blocks)

    params = UniTokenModel.random(config.model, seed=0).params
    replicated = NamedSharding(mesh, PartitionSpec())
    everywhere = jax.tree.map(lambda x: multihost_utils.host_local_array_to_global_array(
        np.asarray(x), mesh, PartitionSpec()), params)
    with program.context():
        pod = jax.jit(make_eval_loss(config.model, batch_shards(mesh)), out_shardings=replicated)(everywhere, batch)
    pod = {k: float(np.asarray(v.addressable_data(0))) for k, v in pod.items()}

    alone = {k: jax.device_put(local[k], jax.local_devices()[0]) for k in loop.BATCH_KEYS}
    # the embeddings, image features put in: this process's rows of the pod's against its own
    module = UniToken(config.model)

    def embed(params, b, blocks):
        return module.apply({"params": params}, b["tokens"], b["is_continuous"], b["feature_index"], b["pixels"],
                            feature_blocks=blocks, method="embed")

    with program.context():
        pod_rows = jax.jit(embed, static_argnums=2, out_shardings=replicated)(everywhere, batch, batch_shards(mesh))
    rows = local["tokens"].shape[0]
    pod_rows = np.asarray(pod_rows.addressable_data(0))[process_id * rows:(process_id + 1) * rows]
    apart = np.abs(pod_rows - np.asarray(jax.jit(embed, static_argnums=2)(params, alone, 1))).max()

    mine = jax.jit(make_eval_loss(config.model, 1))(params, alone)
    # every process gathers every result before any asserts (one that stopped alone would leave
    # the other waiting in the collective)
    mine = np.array([apart, float(mine["loss"]) * float(mine["tokens"]), float(mine["tokens"]),
                     local["is_continuous"].sum()])
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    total = everyone[:, 1:3].sum(axis=0)
    print(f"process {process_id}: embeddings apart by at most {everyone[:, 0].tolist()}; pod loss "
          f"{pod['loss']:.6f} over {pod['tokens']:.0f} tokens, the processes alone {total[0] / total[1]:.6f} "
          f"over {total[1]:.0f}", flush=True)
    assert (everyone[:, 3] > 0).all(), f"a process's rows hold no SigLIP features, nothing to check: {everyone[:, 3]}"
    assert (everyone[:, 0] <= 1e-5).all(), f"the pod put other features in than each process alone: {everyone[:, 0]}"
    assert pod["tokens"] == total[1], (pod, total)
    np.testing.assert_allclose(pod["loss"], total[0] / total[1], rtol=2e-5)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
