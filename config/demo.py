# A tiny model on the built-in synthetic clips: a few minutes on a laptop CPU.
# python scripts/synth.py --out data_synth && python train.py config/demo.py
out_dir = 'out/demo'
train_json = 'data_synth/train.json'
eval_json = 'data_synth/eval.json'
device = 'cpu'
dtype = 'float32'
compile = False
backend = 'gloo'
num_workers = 2
batch_size = 32
audio_length = 128     # 1.28 s segments: 8 x 8 audio patches
img_size = 64          # 4 x 4 visual patches
embed_dim = 128
num_heads = 4
modality_depth = 2
decoder_embed_dim = 64
decoder_depth = 1
decoder_num_heads = 4
num_registers = 2
learning_rate = 1e-3
con_weight = 1.0       # the paper's 0.1 leaves a model this small no time to align the modalities
epochs = 60.0
warmup_epochs = 3.0
eval_interval = 100
log_interval = 20
