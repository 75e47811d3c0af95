"""Talk to a checkpoint: `python recipes/serve.py checkpoint=RUN_DIR` then open http://127.0.0.1:8765/.

A WebSocket server (tml.serve.server) holding one StreamingSession per connection, and the page that captures the
microphone, plays the model and draws the conversation. Binds to 127.0.0.1 unless host= says otherwise.
"""

from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.cli import check_overrides, recipe_run
from tml.eval.loading import load_run
from tml.eval.session import SessionConfig, StreamingSession
from tml.serve.server import ServeConfig, Server, serve_forever


@dataclass
class ServeRecipeConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or a step dir
    host: str = "127.0.0.1"  # loopback; any other address (e.g. 0.0.0.0) exposes the model to the network
    port: int = 8765  # 0 picks a free port (printed)
    serve: ServeConfig = field(default_factory=ServeConfig)
    session: SessionConfig = field(default_factory=SessionConfig)


ConfigStore.instance().store(name="serve_schema", node=ServeRecipeConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="serve")
def main(cfg) -> None:
    with recipe_run(Path(HydraConfig.get().runtime.output_dir), "serve"):
        cfg: ServeRecipeConfig = OmegaConf.to_object(cfg)
        if cfg.serve.threads:
            torch.set_num_threads(cfg.serve.threads)
        run = load_run(cfg.checkpoint)
        server = Server(lambda: StreamingSession(run.model, run.layout, run.dmel, cfg.session, run.text.pad_id),
                        run.text, cfg.serve, name=str(run.step_dir))
        serve_forever(server, cfg.host, cfg.port)

if __name__ == "__main__":
    check_overrides(ServeRecipeConfig)
    main()
