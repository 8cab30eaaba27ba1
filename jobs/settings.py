"""Deployment settings from the environment, with local defaults (what the Makefile sets)."""

import os
from dataclasses import dataclass

from sae_platform.settings import env_value

EXECUTORS = ("multiprocess", "celery", "k8s")  # where full_pipeline's steps run (jobs.full_pipeline.pipeline_executor)


@dataclass(frozen=True)
class Settings:
    root_url: str
    data_dir: str
    inbox: str
    s3_endpoint_url: str | None
    holdout: str = ""  # held-out text for downstream CE; default $SAE_PLATFORM_DATA/holdout/*
    run_config: str | None = None  # full_pipeline run config used by sensors and schedules
    executor: str = EXECUTORS[0]  # where full_pipeline's steps run: one of EXECUTORS

    @classmethod
    def from_env(cls) -> "Settings":
        data_dir = os.path.abspath(os.environ.get("SAE_PLATFORM_DATA", "data"))
        return cls(
            root_url=os.environ.get("SAE_PLATFORM_ROOT", os.path.abspath("artifacts")),
            data_dir=data_dir,
            inbox=os.environ.get("SAE_PLATFORM_INBOX", os.path.join(data_dir, "inbox", "*")),
            s3_endpoint_url=os.environ.get("SAE_PLATFORM_S3_ENDPOINT_URL") or None,
            holdout=os.environ.get("SAE_PLATFORM_HOLDOUT", os.path.join(data_dir, "holdout", "*")),
            run_config=os.environ.get("SAE_PLATFORM_RUN_CONFIG") or None,
            executor=env_value("SAE_PLATFORM_EXECUTOR", EXECUTORS[0], choices=EXECUTORS),
        )

    def storage_config(self, configured: dict | None = None) -> dict:
        """The storage resource's config: this environment's root and S3 endpoint, under the run
        config file's ``resources.storage.config`` (``configured``), which wins."""
        return {"root_url": self.root_url, "endpoint_url": self.s3_endpoint_url, **(configured or {})}

    @property
    def holdout_pattern(self) -> str:
        return self.holdout or os.path.join(self.data_dir, "holdout", "*")
