"""``--model`` given as a hub id: the local snapshot in the ModelScope (default) or Hugging Face
(``--use_hf``) cache, downloaded when online. Offline and not cached is a clear error."""

from __future__ import annotations

import os
from typing import Optional

from megatron_swift.data.loading import offline_mode


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_dir(model: str, use_hf: bool = False, hub_token: Optional[str] = None,
                      revision: Optional[str] = None) -> str:
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))
    offline = offline_mode()["hf" if use_hf else "modelscope"]
    hub = "Hugging Face" if use_hf else "ModelScope"
    try:
        if use_hf:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, revision=revision, token=hub_token, local_files_only=offline)
        from modelscope import snapshot_download

        return snapshot_download(model, revision=revision, local_files_only=offline)
    except Exception as e:  # hub clients raise many types (offline, 404, connection)
        why = ("it is not in the local cache and offline mode forbids downloading it" if offline
               else f"downloading it failed ({type(e).__name__}: {str(e)[:200]})")
        other = "ModelScope (drop --use_hf)" if use_hf else "Hugging Face (--use_hf true)"
        raise ModelNotFoundError(f"--model {model!r}: not a local directory, and from {hub} {why}. Pass a local "
                                 f"model directory, download it into the cache first, or try {other}.") from None
