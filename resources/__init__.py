"""Dagster resources: configuration that says *where* (storage root, model, text source)."""

from dataclasses import fields

from dagster import ConfigurableResource
from pydantic import Field, create_model, field_validator

from sae_platform.absorption import AbsorptionSettings
from sae_platform.activations import CacheSettings
from sae_platform.corpus import TextFile, check_encoding, find_file, list_source, resolve_source, source_stamp
from sae_platform.evaluate import EvalSettings
from sae_platform.features import FeatureSettings
from sae_platform.inbox import Inbox, scan_inbox
from sae_platform.llm_explain import ChatClient, public_url
from sae_platform.model import AUTOCAST_HELP, EMBEDDED_MODEL, load_stored_model, load_stored_tokenizer
from sae_platform.settings import DEFAULT_DEVICE, DEVICE_DOC, SettingsError, default_of, read_run_config
from sae_platform.shuffle import ShuffleSettings
from sae_platform.storage import ArtifactStore, open_store
from sae_platform.synthetic import SyntheticSettings
from sae_platform.trainer import TrainSettings


class StorageResource(ConfigurableResource):
    """The artifact root: a local folder (default) or ``s3://bucket/prefix``."""

    root_url: str = Field(description="fsspec URL of the artifact root, e.g. /data/sae or s3://bucket/sae")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto, …)")
    create_bucket: bool = Field(default=False, description="create a missing S3 bucket (default: fail with "
                                                           "'bucket does not exist'; SAE_PLATFORM_CREATE_BUCKET=1 too)")

    def store(self) -> ArtifactStore:
        return open_store(self.root_url, self.endpoint_url, create_bucket=self.create_bucket or None)


class BaseModelResource(ConfigurableResource):
    """The language model whose residual stream we cache, and where to read it."""

    source: str = Field(default=EMBEDDED_MODEL,
                        description=f"{EMBEDDED_MODEL!r} (embedded, offline), a local HF model dir, or a hub name")
    layer: int | None = Field(default=None, description="residual stream after this block; default: middle")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1, …")
    autocast: str = Field(default="auto", description=AUTOCAST_HELP)

    def load(self, store: ArtifactStore, device: str | None = None):
        return load_stored_model(store, self.source, self.layer, device or self.device, self.autocast)

    def tokenizer(self, store: ArtifactStore):
        """The tokenizer alone (no weights loaded)."""
        return load_stored_tokenizer(store, self.source)


class LLMExplainerResource(ConfigurableResource):
    """The model that writes and scores LLM explanations (optional ``feature_llm_explanations``): an
    OpenAI-compatible chat endpoint, or by default the embedded model through transformers (offline)."""

    enabled: bool = Field(default=False, description="write LLM explanations (off by default: feature_llm_explanations "
                                                     "and its full_pipeline step are skipped)")
    base_url: str = Field(default="", description="OpenAI-compatible endpoint up to the version, e.g. "
                                                  "http://127.0.0.1:8080/v1; empty: local_model through transformers")
    model: str = Field(default="default", description="model name sent to the endpoint")
    api_key_env: str = Field(default="SAE_PLATFORM_LLM_API_KEY", description="environment variable holding the API "
                                                                             "key (the key itself is never configured "
                                                                             "or logged)")
    local_model: str = Field(default=EMBEDDED_MODEL, description="without base_url: the model to run locally "
                                                                 f"({EMBEDDED_MODEL!r}: the embedded "
                                                                 "SmolLM2-135M-Instruct), or a local HF folder")
    features_per_shard: int = Field(default=8, ge=1, description="latents explained per feature shard (those firing "
                                                                 "most often on the held-out text): the SAE gets up "
                                                                 "to this times its planned feature shards")
    examples: int = Field(default=5, ge=1, description="held-out activating and as many non-activating texts per "
                                                       "detection score")
    timeout_s: float = Field(default=default_of(ChatClient, "timeout_s"), gt=0,
                             description="with base_url: the most one answer may take, wall clock (connect, wait, "
                                         "read); a slower answer fails its feature")

    def backend(self, store: ArtifactStore):
        import os

        from sae_platform.llm_explain import LocalChat
        from sae_platform.model import ensure_base_model

        if self.base_url:
            return ChatClient(self.base_url, self.model, os.environ.get(self.api_key_env) or None, self.timeout_s)
        model_dir, _ = ensure_base_model(store, self.local_model)
        return LocalChat(model_dir)

    def describe(self) -> str:
        """What explains, in words for metadata: never the key, never a URL's credentials."""
        if not self.base_url:
            return f"{self.local_model} through transformers (local)"
        return f"{self.model} at {public_url(self.base_url)}"


class TextSourceResource(ConfigurableResource):
    """Where new text arrives: a glob over .txt / .jsonl / .parquet files, local or s3."""

    pattern: str = Field(description="fsspec glob, e.g. data/inbox/* or s3://bucket/inbox/*.jsonl")
    text_field: str = Field(default="text", description="JSON field / parquet column holding the text")
    encoding: str = Field(default="utf-8", description="text encoding of .txt/.jsonl files")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint for s3:// patterns")
    skip_duplicates: bool = Field(default=True, description="a file byte-identical to another inbox file is "
                                                            "reported and not cached again; false caches copies")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        return check_encoding(encoding)

    @property
    def storage_options(self) -> dict:
        return resolve_source(self.pattern, self.endpoint_url)[1]

    def _resolved(self) -> str:
        return resolve_source(self.pattern, self.endpoint_url)[0]

    def scan(self, store: ArtifactStore | None = None, hash_budget_s: float | None = None) -> Inbox:
        """Files to cache (keys, stamps) and files skipped with their reason (sae_platform.inbox);
        with ``store``, of byte-identical files the cached one stays the original, and a renamed
        cached file is not cached again. Comparing contents takes at most ``hash_budget_s`` seconds."""
        return scan_inbox(self._resolved(), self.storage_options, store, self.skip_duplicates, hash_budget_s)

    def files(self, store: ArtifactStore | None = None) -> list[TextFile]:
        files = self.scan(store).files
        return files if files else list_source(self._resolved(), self.storage_options)  # raises, naming why

    def file(self, key: str, store: ArtifactStore | None = None) -> TextFile:
        return find_file(self.pattern, key, files=self.scan(store).files)

    def stamps(self, files: list[TextFile] | None = None) -> dict[str, str]:
        """Partition key → size and modification stamp, to notice files replaced under the same name."""
        return {f.key: source_stamp(f, self.storage_options) for f in (self.files() if files is None else files)}


class StageSettingsResource(ConfigurableResource):
    """Base of the stage settings resources below: each field is a field of the stage's settings
    dataclass in the compute core, with its documentation and default (``sae_platform.settings``)."""

    def settings(self, **overrides):
        """The stage's validated settings dataclass (raises SettingsError naming a bad value)."""
        values = {name: getattr(self, name) for name in self.settings_class.__dataclass_fields__
                  if name in type(self).model_fields}
        return self.settings_class(**{**values, **overrides})


# key -> (settings dataclass, fields left out, whether the stage picks a device)
STAGE_SETTINGS = {
    "caching": (CacheSettings, (), False),
    "shuffle": (ShuffleSettings, (), False),
    "training": (TrainSettings, ("variant", "n_latents", "k", "hparams", "hook_point"), True),  # the sweep entry's own
    "evaluation": (EvalSettings, (), True),
    "features": (FeatureSettings, (), True),
    "absorption": (AbsorptionSettings, (), True),
    "synthetic": (SyntheticSettings, (), False),  # n_features set: activations are drawn, not cached from text
}


# key -> the settings each stage resource holds (what an old-style op config key maps to)
SETTINGS_FIELDS = {key: {f.name for f in fields(cls) if f.name not in left_out} | ({"device"} if device else set())
                   for key, (cls, left_out, device) in STAGE_SETTINGS.items()}


def stage_resource(key: str, deployment: dict | None = None) -> StageSettingsResource:
    """The resource holding stage ``key``'s settings. Its schema is generated from the settings
    dataclass, with ``deployment`` (the run config file's ``resources.<key>.config``) as defaults:
    so a partial override in a run config keeps the deployment's other values, and the Launchpad
    scaffolds them."""
    settings_class, left_out, has_device = STAGE_SETTINGS[key]
    deployment = dict(deployment or {})
    unknown = set(deployment) - {f.name for f in fields(settings_class) if f.name not in left_out} - {"device"}
    if unknown:
        raise SettingsError(f"resources.{key}.config has unknown setting(s) {', '.join(sorted(unknown))}",
                            f"remove them; the settings of {key} are: "
                            + ", ".join(f.name for f in fields(settings_class) if f.name not in left_out))
    device = deployment.pop("device", DEFAULT_DEVICE)
    settings_class(**deployment)  # validate the deployment's values once, when the code loads
    model_fields = {}
    for declared in fields(settings_class):
        if declared.name in left_out:
            continue
        default = deployment.get(declared.name, default_of(settings_class, declared.name))
        model_fields[declared.name] = (declared.type, Field(default=default, description=declared.metadata["doc"]))
    if has_device:
        model_fields["device"] = (str, Field(default=device, description=DEVICE_DOC))
    name = f"{key.title()}Resource"
    resource_class = create_model(name, __base__=StageSettingsResource, __module__=__name__,
                                  __doc__=settings_class.__doc__, **model_fields)
    resource_class.settings_class = settings_class
    return resource_class()


class AutomationResource(ConfigurableResource):
    """The run config of runs that sensors and schedules launch on their own: the deployment's
    run config file (``SAE_PLATFORM_RUN_CONFIG``, e.g. ``config/demo.yaml``), so automated runs
    match the ones a person launches."""

    run_config_path: str | None = Field(default=None, description="YAML run config of full_pipeline; "
                                                                  "default: every setting's default")

    def run_config(self) -> dict:
        return read_run_config(self.run_config_path)

    def inbox_run_config(self, keys: list[str]) -> dict:
        """Run config of a `cache_inbox` run caching ``keys``: the file's resources (stage settings
        are resources, so that is all a caching run needs) and the keys."""
        config = self.run_config()
        return {**({"resources": config["resources"]} if config.get("resources") else {}),
                "ops": {"activation_batches": {"config": {"keys": list(keys)}}}}
