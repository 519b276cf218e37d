# The CAV-MAE Sync baseline on AudioSet-2M: one pass at 75% masking, 25 epochs, 2.5 warmup.
# torchrun --standalone --nproc_per_node=8 train.py config/sync_as2m.py
out_dir = 'out/sync_as2m'
train_json = 'data/audioset/as2m_train.json'  # scripts/splits.py audioset (shards: shard.py)
eval_json = 'data/audioset/retrieval.json'  # scripts/splits.py subset
init_from = 'checkpoints/mae_pretrain_vit_base_full.pth'  # ImageNet MAE ViT-B, encoder and decoder, as the releases
method = 'sync'
batch_size = 64
epochs = 25.0
warmup_epochs = 2.5
eval_interval = 5000
