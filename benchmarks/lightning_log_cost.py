"""What Lightning's per-step self.log costs (run by hand; prints figures, asserts nothing).

A trivial LightningModule trained for 3 epochs of 100 steps, without logging and with six values
logged per step (on_epoch=True, as atlasreg did before it kept its own epoch means):

    python benchmarks/lightning_log_cost.py
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Trivial(L.LightningModule):
    def __init__(self, n_logged: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.n_logged = n_logged

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0].mean()) ** 2
        if self.n_logged:
            self.log_dict({f"l{k}": loss for k in range(self.n_logged)}, on_step=False, on_epoch=True,
                          batch_size=10)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    data = TensorDataset(torch.randn(1000, 1, 64, 64), torch.randn(1000, 2, 64, 64))
    for n_logged in (0, 6, 0, 6):
        trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(Trivial(n_logged), DataLoader(data, batch_size=10, shuffle=True))
        print(f"{n_logged} values logged per step: {(time.perf_counter() - t0) / 300 * 1000:.2f} ms per step",
              flush=True)


if __name__ == "__main__":
    main()
