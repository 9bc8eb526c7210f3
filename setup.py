from setuptools import setup

# One import name, `gesso`, as diffusers has `diffusers`: the repository root is the package, so its
# engine/, kernels/, models/, commands/ and cli.py install as gesso.engine, gesso.kernels, gesso.models,
# gesso.commands and gesso.cli, and a host's own `models` or `engine` package is never shadowed.
PACKAGES = ["gesso", "gesso.commands", "gesso.engine", "gesso.engine.config", "gesso.engine.data", "gesso.engine.embedding",
            "gesso.engine.lora", "gesso.engine.loop", "gesso.engine.measure", "gesso.engine.memory", "gesso.engine.run", "gesso.engine.sampling",
            "gesso.kernels", "gesso.models", "gesso.serve"]

setup(
    name="gesso",
    version="0.1.0",
    description="Fast LoRA training for Stable Diffusion XL and SD 1.5, with Triton kernels",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={"gesso": "."},
    # the CLIP vocabulary; the dispatch table a GPU session measured (kernels/dispatch.py: absent until one has,
    # installed once it exists); gesso serve's page (HTML, scripts, styles and the vendored chart library with its licence)
    package_data={"gesso.models": ["tokenizers/clip/*"], "gesso.kernels": ["dispatch_table.json"],
                  "gesso.serve": ["static/*", "static/vendor/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "transformers>=4.40",
        "huggingface_hub>=0.23",
        "numpy",
        "Pillow",
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow or the tensorboard server package
    ],
    extras_require={
        # diffusers and transformers are the references the parity tests compare against; peft is what
        # diffusers' load_lora_weights needs to load our LoRA files in the format tests.
        # lycoris-lora is the reference for the LoHa/LoKr/DoRA deltas; onnx builds the tiny WD tagger graph that
        # the caption tests run on onnxruntime; scipy's KS test and CDFs check the timestep distributions; the
        # optimizers extra is tested against the libraries' own steps.
        # fastapi, uvicorn and httpx: the serve tests start a real `gesso serve` and talk to it over HTTP; selenium drives
        # the page's tests in a headless Chromium (Debian's chromium and chromium-driver, which .ci/run installs)
        # pytest-xdist: the whole suite in two worker processes, one per core of a 2-core CI machine (42 min in one
        # process, 24 min in two, measured 2026-12-03), each test file kept whole on one worker (--dist loadfile) so
        # that a module's live server, browser or trained demo is set up once
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "diffusers>=0.30", "peft", "onnxruntime", "onnx",
                 "lycoris-lora>=4.1", "scipy", "schedulefree>=1.4", "pytorch-optimizer>=3.0",
                 "fastapi>=0.110", "uvicorn[standard]>=0.29", "httpx>=0.27", "selenium>=4.20"],
        # train.optimizer = adamw_schedulefree (schedulefree's AdamWScheduleFree), came and lion (pytorch-optimizer)
        "optimizers": ["schedulefree>=1.4", "pytorch-optimizer>=3.0"],
        # `gesso serve`: the HTTP job API, on FastAPI (Starlette underneath, OpenAPI schema from it) served by uvicorn;
        # [standard] brings its C parser (httptools) and event loop (uvloop): 0.56 ms of server CPU per status request
        # instead of 0.79 with the pure-Python h11 and asyncio (benchmarks/serve_load.py, 2026-12-03, benchmarks/README.md)
        "serve": ["fastapi>=0.110", "uvicorn[standard]>=0.29"],
        # `gesso caption --captioner tagger`: WD taggers ship model.onnx; BLIP needs only transformers
        "caption": ["onnxruntime"],
        # the viewer for <output>/tensorboard (tensorboardX above only writes the files): `tensorboard --logdir ...`
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["gesso=gesso.cli:main"]},
)
