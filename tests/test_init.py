"""Initialisation as the releases do it: ImageNet MAE weights (encoder-only and full file) mapped as CAV-MAE's
adapt_vmae_weights.py, the converted CAV-MAE-layout file, register tokens drawn N(0, 1), and one loading function
(model.load_weights) for train.py's init_from and evaluate.load_model, including {'model': state_dict} files."""
import os
import subprocess
import sys

import pytest
import torch

from model import CAVMAESync, ModelConfig, checkpoint_kind, convert_official_state_dict, load_weights, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny model whose sizes a hand-built "MAE" can match: D=48, 2 + 1 blocks, decoder 32 wide, 2 blocks, 8-px patches
TINY = dict(audio_length=64, num_mel_bins=32, img_size=32, patch_size=8, embed_dim=48, num_heads=4,
            modality_depth=2, joint_depth=1, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
            num_registers=2)
D, DD, P = 48, 32, 8
MAE_DEPTH, MAE_DECODER_DEPTH = 4, 3  # one block more than the model takes, in each


def block_shapes(dim):
    h = 4 * dim
    return [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('attn.qkv.weight', (3 * dim, dim)),
            ('attn.qkv.bias', (3 * dim,)), ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
            ('norm2.weight', (dim,)), ('norm2.bias', (dim,)), ('mlp.fc1.weight', (h, dim)), ('mlp.fc1.bias', (h,)),
            ('mlp.fc2.weight', (dim, h)), ('mlp.fc2.bias', (dim,))]


def random_mae(full=True, seed=0):
    """A random checkpoint in the public MAE layout (models_mae.MaskedAutoencoderViT state dict under 'model';
    the encoder-only file has no decoder keys), at the tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + (32 // P) ** 2  # cls + patch positions of MAE's image grid
    sd = {'cls_token': torch.randn(1, 1, D, generator=g), 'pos_embed': torch.randn(1, n, D, generator=g),
          'patch_embed.proj.weight': torch.randn(D, 3, P, P, generator=g),
          'patch_embed.proj.bias': torch.randn(D, generator=g)}
    for i in range(MAE_DEPTH):
        for name, shape in block_shapes(D):
            sd[f'blocks.{i}.{name}'] = torch.randn(*shape, generator=g)
    sd['norm.weight'], sd['norm.bias'] = torch.randn(D, generator=g), torch.randn(D, generator=g)
    if full:
        sd.update({'mask_token': torch.randn(1, 1, DD, generator=g),
                   'decoder_pos_embed': torch.randn(1, n, DD, generator=g),
                   'decoder_embed.weight': torch.randn(DD, D, generator=g),
                   'decoder_embed.bias': torch.randn(DD, generator=g)})
        for i in range(MAE_DECODER_DEPTH):
            for name, shape in block_shapes(DD):
                sd[f'decoder_blocks.{i}.{name}'] = torch.randn(*shape, generator=g)
        sd.update({'decoder_norm.weight': torch.randn(DD, generator=g),
                   'decoder_norm.bias': torch.randn(DD, generator=g),
                   'decoder_pred.weight': torch.randn(P * P * 3, DD, generator=g),
                   'decoder_pred.bias': torch.randn(P * P * 3, generator=g)})
    return {'model': sd}


def adapt_vmae_reference(mdl_weight, modal_specific_layer=2, total_layers=3):
    """CAV-MAE's adapt_vmae_weights.py, restated step by step on a plain dict (CAV-MAE names): the names the
    script loads by name match with strict=False, its additional_weight loops, then its explicit assignments."""
    out = {}
    for key in ('norm.weight', 'norm.bias', 'decoder_embed.weight', 'decoder_embed.bias', 'mask_token',
                'decoder_norm.weight', 'decoder_norm.bias'):  # load_state_dict(mdl_weight, strict=False) matches
        if key in mdl_weight:
            out[key] = mdl_weight[key]
    for key in mdl_weight:
        if key.startswith('decoder_blocks.') and int(key.split('.')[1]) < TINY['decoder_depth']:
            out[key] = mdl_weight[key]
        if 'blocks' in key and 'decoder' not in key:
            block_id = int(key.split('.')[1])
            rest = '.'.join(key.split('.')[2:])
            if block_id <= modal_specific_layer - 1:
                out['blocks_a.' + key[7:]] = mdl_weight[key]
                out['blocks_v.' + key[7:]] = mdl_weight[key]
            elif block_id < total_layers:  # the script has 12 blocks for 12 layers; this MAE has one to spare
                out[f'blocks_u.{block_id - modal_specific_layer}.{rest}'] = mdl_weight[key]
    for block_id in range(modal_specific_layer, total_layers):
        for norm in ('norm1', 'norm2'):
            for part in ('weight', 'bias'):
                for m in ('a', 'v'):
                    j = block_id - modal_specific_layer
                    out[f'blocks_u.{j}.{norm}_{m}.{part}'] = mdl_weight[f'blocks.{block_id}.{norm}.{part}']
    for m in ('a', 'v'):
        out[f'norm_{m}.weight'], out[f'norm_{m}.bias'] = mdl_weight['norm.weight'], mdl_weight['norm.bias']
    out['cls_token_a'] = out['cls_token_v'] = out['cls_token_av'] = mdl_weight['cls_token']
    w = mdl_weight['patch_embed.proj.weight']
    out['patch_embed_a.proj.weight'] = (w[:, 0] + w[:, 1] + w[:, 2]).unsqueeze(1)  # torch.sum over dim 1
    out['patch_embed_a.proj.bias'] = mdl_weight['patch_embed.proj.bias']
    out['patch_embed_v.proj.weight'] = w
    out['patch_embed_v.proj.bias'] = mdl_weight['patch_embed.proj.bias']
    if 'decoder_pred.weight' in mdl_weight:
        out['decoder_pred_a.weight'] = mdl_weight['decoder_pred.weight'][:P * P]  # [:256] at 16-px patches
        out['decoder_pred_a.bias'] = mdl_weight['decoder_pred.bias'][:P * P]
        out['decoder_pred_v.weight'] = mdl_weight['decoder_pred.weight']
        out['decoder_pred_v.bias'] = mdl_weight['decoder_pred.bias']
    return out


def fresh(**kw):
    torch.manual_seed(0)
    return CAVMAESync(ModelConfig(**{**TINY, **kw}))


def check_against(model, before, expected):
    """Every parameter: the expected tensor where the release's conversion gives one, else unchanged."""
    sd = model.state_dict()
    for name, _ in model.named_parameters():
        if name in expected:
            assert torch.equal(sd[name], expected[name]), name
        else:
            assert torch.equal(sd[name], before[name]), f'{name} should have stayed at init'


@pytest.mark.parametrize('full', [True, False])
def test_mae_weights_map_as_adapt_vmae_weights(full, capsys):
    mae = random_mae(full)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = load_weights(model, mae)
    expected = adapt_vmae_reference(mae['model'])
    check_against(model, before, expected)
    assert out['kind'] == 'mae' and set(out['loaded']) == set(expected) & set(before)
    at_init = {'modality_a', 'modality_v', 'register_tokens', 'decoder_modality_a', 'decoder_modality_v'}
    if not full:
        at_init |= {n for n, _ in model.named_parameters() if n.startswith(('decoder', 'mask_token'))}
    assert set(out['at_init']) == at_init
    last = (f'blocks.{MAE_DEPTH - 1}.', f'decoder_blocks.{MAE_DECODER_DEPTH - 1}.')  # one block too many
    spare = [k for k in mae['model'] if k.startswith(last)]
    assert out['unused'] == sorted(['pos_embed'] + (['decoder_pos_embed'] if full else []) + spare)
    # the audio filter is the SUM over RGB (3x the mean), the audio prediction head MAE's first p*p rows
    w = mae['model']['patch_embed.proj.weight']
    assert torch.allclose(model.patch_embed_a.proj.weight, 3 * w.mean(dim=1, keepdim=True), atol=1e-6)
    if full:
        assert torch.equal(model.decoder_pred_a.weight, mae['model']['decoder_pred.weight'][:64])
        assert torch.equal(model.decoder_blocks[1].mlp.fc1.weight, mae['model']['decoder_blocks.1.mlp.fc1.weight'])
    report = capsys.readouterr().out
    assert 'ImageNet MAE' in report and 'left at init: ' in report and 'register_tokens' in report


def test_mae_weights_errors_and_decoder_options():
    mae = random_mae()
    bad = {'model': dict(mae['model'], **{'blocks.0.attn.qkv.weight': torch.zeros(5, 5)})}
    with pytest.raises(ValueError, match='blocks_a.0.attn.qkv.weight'):
        load_weights(fresh(), bad)
    # the cross-attention decoder has other block names: its blocks stay at init, the rest still loads
    model = fresh(decoder_attention='cross')
    out = load_weights(model, mae)
    assert all(n in out['at_init'] for n, _ in model.decoder_blocks.named_parameters(prefix='decoder_blocks'))
    assert torch.equal(model.decoder_embed.weight, mae['model']['decoder_embed.weight'])
    assert any(k.startswith('decoder_blocks.0.') for k in out['unused'])
    # the encoder-only teacher takes the encoder part
    teacher = CAVMAESync(ModelConfig(**TINY), decoder=False)
    load_weights(teacher, mae)
    assert torch.equal(teacher.blocks_u[0].norm2_v.bias, mae['model']['blocks.2.norm2.bias'])


def converted_file(mae):
    """ori_mae_11_for_pretrain.pth as adapt_vmae_weights.py saves it: a full CAV-MAE state dict (audio
    positions for 1024 frames, six LayerNorms in every block, random modality embeddings), the MAE tensors
    in place, plus three copies of cls_token."""
    g = torch.Generator().manual_seed(3)
    sd = adapt_vmae_reference(mae['model'])
    na = (TINY['num_mel_bins'] // P) * (1024 // P)
    extra = {'modality_a': (1, 1, D), 'modality_v': (1, 1, D), 'decoder_modality_a': (1, 1, DD),
             'decoder_modality_v': (1, 1, DD), 'pos_embed_a': (1, na, D), 'pos_embed_v': (1, 16, D),
             'decoder_pos_embed_a': (1, na, DD), 'decoder_pos_embed_v': (1, 16, DD)}
    for i in range(TINY['decoder_depth']):
        for n in ('norm1_a', 'norm1_v', 'norm2_a', 'norm2_v'):
            extra[f'decoder_blocks.{i}.{n}.weight'] = extra[f'decoder_blocks.{i}.{n}.bias'] = (DD,)
    for i in range(TINY['modality_depth']):
        for m in 'av':
            for n in ('norm1_a', 'norm1_v', 'norm2_a', 'norm2_v'):
                extra[f'blocks_{m}.{i}.{n}.weight'] = extra[f'blocks_{m}.{i}.{n}.bias'] = (D,)
    sd.update({k: torch.randn(*shape, generator=g) for k, shape in extra.items()})
    return sd


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_converted_cavmae_layout_file_loads_by_name(prefix, capsys):
    mae = random_mae()
    sd = converted_file(mae)
    ckpt = {prefix + k: v for k, v in sd.items()}
    assert checkpoint_kind(ckpt) == 'cavmae'
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = load_weights(model, ckpt)
    check_against(model, before, sd)  # modality embeddings from the file; registers at init
    assert out['kind'] == 'cavmae' and out['at_init'] == ['register_tokens']
    unused = {k[len(prefix):] for k in out['unused']}
    unused_norms = {k for k in sd if k.startswith(('blocks_a', 'blocks_v', 'decoder_blocks')) and
                    k.split('.')[2] in ('norm1_a', 'norm1_v', 'norm2_a', 'norm2_v')}
    assert len(unused_norms) == 8 * (2 * TINY['modality_depth'] + TINY['decoder_depth'])
    positions = {'pos_embed_a', 'pos_embed_v', 'decoder_pos_embed_a', 'decoder_pos_embed_v'}
    assert unused == {'cls_token_av'} | positions | unused_norms
    # without global tokens (a CAV-MAE model) it is still that layout; the global tokens stay at init
    no_cls = {k: v for k, v in sd.items() if not k.startswith('cls_token')}
    assert checkpoint_kind({'model': no_cls}) == 'cavmae'
    assert set(load_weights(fresh(), {'model': no_cls})['at_init']) == {'register_tokens', 'cls_token_a', 'cls_token_v'}
    assert 'CAV-MAE layout' in capsys.readouterr().out


def test_register_tokens_are_drawn_as_the_releases():
    """torch.randn (std 1) as in both releases, not the N(0, 0.02) of the other tokens."""
    model = CAVMAESync(ModelConfig(**{**TINY, 'num_registers': 8}))  # 16 x 48 values
    assert 0.85 < model.register_tokens.std().item() < 1.15
    for name in ('cls_token_a', 'mask_token', 'modality_v', 'decoder_modality_a'):
        assert 0.01 < getattr(model, name).std().item() < 0.03, name


def official_tiny(seed=0):
    """A random model saved in the official layout (every block with six LayerNorms, 'module.' prefix)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**TINY)
    sd = {'module.' + k: torch.randn_like(v) for k, v in CAVMAESync(cfg).state_dict().items()}
    for i in range(cfg.modality_depth):
        for m in 'av':
            for n in ('norm1_a', 'norm1_v', 'norm2_a', 'norm2_v'):
                sd[f'module.blocks_{m}.{i}.{n}.weight'] = torch.randn(D)
                sd[f'module.blocks_{m}.{i}.{n}.bias'] = torch.randn(D)
    return cfg, sd


def test_load_weights_takes_wrapped_and_bare_official_files(tmp_path):
    cfg, sd = official_tiny()
    want = convert_official_state_dict(sd, cfg)
    for name, content in (('bare.pth', sd), ('wrapped.pth', {'model': sd})):
        path = str(tmp_path / name)
        torch.save(content, path)
        model = CAVMAESync(cfg)
        assert load_weights(model, path)['kind'] == 'official'
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match='no teacher'):
        load_weights(CAVMAESync(cfg, decoder=False), str(tmp_path / 'wrapped.pth'), weights='teacher')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_checkpoint(str(tmp_path / 'nope.pth'))


def test_train_py_init_from_wrapped_official_and_mae_full(tmp_path):
    """train.py's init_from goes through load_weights: a {'model': state_dict} release (it failed before)
    and the full MAE file. learning_rate=0: the saved weights are the loaded ones."""
    subprocess.run([sys.executable, 'scripts/synth.py', '--out', str(tmp_path / 'd'), '--num_clips', '20'],
                   cwd=ROOT, check=True, capture_output=True)
    cfg, sd = official_tiny()
    sources = {'official': ({'model': sd}, convert_official_state_dict(sd, cfg)),
               'mae': (random_mae(), adapt_vmae_reference(random_mae()['model']))}
    args = ['--device=cpu', '--dtype=float32', '--compile=False', '--backend=gloo', '--num_workers=0',
            '--audio_length=64', '--num_mel_bins=32', '--img_size=32', '--patch_size=8', '--embed_dim=48',
            '--num_heads=4', '--modality_depth=2', '--decoder_embed_dim=32', '--decoder_depth=2',
            '--decoder_num_heads=4', '--num_registers=2', '--batch_size=4', '--max_iters=1', '--learning_rate=0.0',
            '--weight_decay=0.0', f'--train_json={tmp_path / "d" / "train.json"}']
    for kind, (content, want) in sources.items():
        path, out = str(tmp_path / f'{kind}.pth'), tmp_path / f'out_{kind}'
        torch.save(content, path)
        proc = subprocess.run([sys.executable, 'train.py', *args, f'--init_from={path}', f'--out_dir={out}'], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ('all' if kind == 'official' else 'left at init') in proc.stdout
        saved = torch.load(out / 'ckpt.pt', weights_only=True)['model']
        assert all(torch.equal(saved[k], v) for k, v in want.items() if k in saved)
