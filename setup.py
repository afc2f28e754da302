from setuptools import find_packages, setup

setup(
    name="ppvilg",
    version="0.1.0",
    description="ERNIE-ViLG in PaddlePaddle: unified bidirectional text<->image generation over VQ tokens",
    packages=find_packages(include=["ppvilg", "ppvilg.*"]) + ["ppvilg_deploy"],
    package_dir={"ppvilg_deploy": "deploy/python/ppvilg_deploy"},
    package_data={"ppvilg": ["data/assets/*", "text/assets/*"], "ppvilg_deploy": ["web/*"]},
    python_requires=">=3.9",
    install_requires=[
        # paddlepaddle (CPU) or paddlepaddle-gpu is installed separately; see README
        "numpy>=2,<3", "opencv-python-headless", "PyYAML", "scipy", "scikit-image", "visualdl", "pycocotools", "tqdm",
        "paddlenlp==2.8.1", "huggingface-hub<1.0", "aistudio-sdk<0.3", "jieba", "pycocoevalcap", "safetensors",
        "fastapi", "uvicorn", "python-multipart",
    ],
)
