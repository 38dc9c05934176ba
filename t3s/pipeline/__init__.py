"""The ``t3s`` pipeline: the stages of a T3S run in a resumable run directory.

It sits between the method library (`t3s`: data, trajectory store, trainer,
profile, selection, artifact, ...) and the command line (`t3s.cli`,
`t3s.demo`); imports point one way: library <- pipeline <- cli / demo.

Modules, lowest first (each imports only those above it):

* `settings`: the options, YAML files, the run's identity and fingerprints.
* `rundir`: the run directory: every file name in it, config, ledger, lock.
* `engine`: what a stage is, when it is current, running stages resumably.
* `loaders`: the device, tokenizer, models (with ``--attn-implementation``) and JSONL
  data a run names.
* `batching`: ``--packing``: packed or padded batches for a loaded model.
* `training`: Trainer pieces shared by the pilot and the retraining stages.
* `report` (a subpackage): ``metrics.json``, ``report.md`` and their figures, and the
  report sections of the arms and of the analyze and sensitivity stages.
* `stages`: the six stages (pilot, select, train, baseline, eval, report);
  they register themselves with the engine.
* `console`: what the command and the demo print.
* `commands`: a ``t3s`` stage subcommand without the command line.

The ``objective: diffusion`` stages and their report live with the diffusion method,
in `t3s.dllm.pipeline` and `t3s.dllm.report` (modules of this layer).

This package module imports none of them, so importing one loads only what it needs.
"""
