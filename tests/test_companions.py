"""EMA of weights and scales, and Quantization Correction folded into BatchNorm (Gupta & Asthana 2023)."""
import pytest
import torch
from torch import nn

import oscqat
from oscqat.training.correction import ChannelAffine, fold_corrections
from helpers.training import make_opt, qat_model, train_steps


def test_ema_averages_parameters_and_copies_state():
    model, x = qat_model()
    ema = oscqat.QATModelEMA(model, decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, make_opt(model), oscqat.QATSchedule(model, 20), x, 1)
    d = ema.current_decay
    assert d == pytest.approx(0.1)                         # ramp (1 + 0) / (10 + 0) below the decay
    ema.update(model)
    for n, p in ema.model.named_parameters():
        new = dict(model.named_parameters())[n].detach()
        assert torch.allclose(p, before[n] * d + new * (1 - d), atol=1e-7), n
    for n, b in ema.model.named_buffers():
        assert torch.equal(b, dict(model.named_buffers())[n]), n
    with pytest.raises(ValueError, match="decay"):
        oscqat.QATModelEMA(model, decay=1.0)


def test_quantization_correction_lowers_the_loss_and_folds_exactly():
    torch.manual_seed(0)
    model, x = qat_model(method="lsq")
    model.eval()
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    y = torch.randint(0, 10, (x.shape[0],))
    loss = nn.functional.cross_entropy
    before = loss(model(x), y).item()
    oscqat.quantization_correction(model, [(x, y)] * 15, loss, lr=1e-2, fold=False)
    layer = model.features[1].conv[0][0]
    assert isinstance(layer.output_correction, ChannelAffine)
    with torch.no_grad():
        unfolded = model(x)
    assert loss(unfolded, y).item() < before
    n = fold_corrections(model)
    assert n > 0 and layer.output_correction is None
    with torch.no_grad():
        assert torch.allclose(model(x), unfolded, rtol=1e-4, atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "output_correction" not in n} == trains


def test_quantization_correction_needs_a_prepared_model():
    with pytest.raises(ValueError, match="prepare"):
        oscqat.quantization_correction(nn.Linear(2, 2), [], nn.functional.mse_loss)
