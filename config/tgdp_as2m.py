# TG-DP on AudioSet-2M, the TG-DP paper's training recipe: 8 GPUs x 64 clips, 35 epochs, 3.5 warmup.
# torchrun --standalone --nproc_per_node=8 train.py config/tgdp_as2m.py
out_dir = 'out/tgdp_as2m'
train_json = 'data/audioset/as2m_train.json'  # scripts/splits.py audioset (shards: shard.py)
eval_json = 'data/audioset/retrieval.json'  # scripts/splits.py subset
init_from = 'checkpoints/mae_pretrain_vit_base_full.pth'  # ImageNet MAE ViT-B, encoder and decoder, as the releases
method = 'tgdp'
batch_size = 64
epochs = 35.0
warmup_epochs = 3.5
eval_interval = 5000
