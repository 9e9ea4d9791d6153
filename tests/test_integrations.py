"""adamkit inside the training frameworks users bring: Hugging Face's Trainer, Accelerate
and Lightning, on tiny randomly initialised models (no downloads), resuming from their
checkpoints bit for bit, with adamkit's optimizers and with CPUOffload. Each framework's
tests skip where it is not installed."""

from __future__ import annotations

import pytest
import torch

import adamkit

pytestmark = pytest.mark.heavy  # the frameworks take seconds to import


def _tiny_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=64, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path, model, **kwargs):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        logging_steps=100,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), **kwargs)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs", "offload"])
def test_hf_trainer_resumes_bit_for_bit(tmp_path, how):
    def run(resume: str | None = None):
        model = _tiny_gpt2()
        adamkit.keep_embeddings_32bit(model)  # as the Trainer does for bitsandbytes' 8-bit classes
        kwargs = {"lr": 1e-3, "state_bits": 8, "min_quant_size": 1024}
        if how == "optimizers":
            trainer = _trainer(tmp_path, model, optimizers=(adamkit.AdamW(model.parameters(), **kwargs), None))
        elif how == "offload":  # the Trainer clips gradients after backward: copied again at step()
            trainer = _trainer(tmp_path, model, optimizers=(adamkit.CPUOffload(model.parameters(), **kwargs), None))
        else:
            trainer = _trainer(tmp_path, model, optimizer_cls_and_kwargs=(adamkit.AdamW, kwargs))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, _weights(model)

    try:
        trainer, uninterrupted = run()
        state = trainer.optimizer.state
        wte = trainer.model.transformer.wte.weight
        assert "exp_avg" in state[wte]  # the embedding: 32-bit state
        assert any("exp_avg_codes" in st for st in state.values())  # the rest: 8-bit
        _, resumed = run(str(tmp_path / "checkpoint-2"))
    finally:
        adamkit.GlobalOptimManager.get_instance().initialize()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.parametrize("cls", [adamkit.AdamW, adamkit.CPUOffload])
def test_accelerate_save_and_load_state(tmp_path, cls):
    accelerate = pytest.importorskip("accelerate")

    def run(resume: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
        opt = cls(model.parameters(), lr=1e-2, state_bits=8, min_quant_size=1024)
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, opt)
        for step in range(4):
            if resume and step < 2:
                continue
            if resume and step == 2:
                accelerator.load_state(str(tmp_path / "state"))
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
            accelerator.backward(model(x).pow(2).mean())
            opt.step()
            opt.zero_grad()
            if not resume and step == 1:
                accelerator.save_state(str(tmp_path / "state"))
        return _weights(model)

    uninterrupted, resumed = run(False), run(True)
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.parametrize("offload", [False, True])
def test_lightning_checkpoint_and_resume(tmp_path, offload):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            if offload:
                return adamkit.CPUOffload(self.parameters(), lr=1e-2, state_bits=8, min_quant_size=1024)
            return adamkit.AdamW8bit(self.parameters(), lr=1e-2, min_8bit_size=1024)

    data = torch.utils.data.TensorDataset(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))

    def fit(ckpt: str | None = None):
        module = Module()
        every = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(
            max_steps=4,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
            callbacks=[every],
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt)  # 2 steps an epoch
        return _weights(module)

    uninterrupted = fit()
    (half,) = [p for p in tmp_path.glob("*.ckpt") if "step=2" in p.name]
    resumed = fit(str(half))
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k
