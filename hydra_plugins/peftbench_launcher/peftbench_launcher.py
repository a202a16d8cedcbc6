"""hydra-submitit-launcher's launchers, with every job named after its run (conf/hydra/launcher/slurm.yaml and
slurm_local.yaml). Hydra instantiates launchers only from the `hydra_plugins` namespace package, hence this home.

The plugin resolves `hydra.launcher.name` once, against the sweep's base config (`method=lora,oft` is not applied
there, so `${method.name}` would read the default method for every job), and submits one SLURM array whose tasks
share that one name. Here `name` is resolved against each job's own config and each job is submitted on its own, so
`squeue` shows e.g. `peftbench-oft-dreambooth-s1`. The cost: one sbatch per run instead of one array, so
`array_parallelism` does not apply (limit concurrent jobs with the cluster's QOS instead). Everything else --
parameters, the job body, checkpoint/requeue on preemption (bench/faults.py) -- is the plugin's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class _NamedJobs:
    """Mixin over the plugin's BaseSubmititLauncher: one submission per job, named by the job's config."""

    def job_name(self, overrides: Sequence[str]) -> str:
        """`hydra.launcher.name` resolved in the job's config (its method, task, seed...)."""
        job = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        return str(job.hydra.launcher.name)

    def executor(self):
        """A submitit executor with the launcher's parameters (generic ones as they are, the rest prefixed with the
        executor's name, as submitit's AutoExecutor expects)."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        executor = self.executor()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            name = self.job_name(overrides)
            log.info(f"\t#{idx} {name} : {' '.join(filter_overrides(overrides))}")
            executor.update_parameters(name=name)
            jobs.append(executor.submit(self, list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                        Singleton.get_state()))
        return [job.results()[0] for job in jobs]


class LocalLauncher(_NamedJobs, submitit_launcher.LocalLauncher):
    """submitit's local executor (subprocesses on this machine): the SLURM path without a cluster."""


class SlurmLauncher(_NamedJobs, submitit_launcher.SlurmLauncher):
    """One SLURM job per run, named after it."""
