from setuptools import find_packages, setup


def _requirements(path):
    with open(path) as fh:
        lines = (ln.split("#", 1)[0].strip() for ln in fh)
        return [ln for ln in lines if ln]


setup(
    name="dl_pipeline",
    version="0.1.0",
    description="Distributed deep-learning pipeline on Spark: Petastorm prepare, Horovod PyTorch train, batch score",
    packages=find_packages(include=["dl_pipeline", "dl_pipeline.*"]),
    package_data={"dl_pipeline": ["log4j2.properties"]},  # the JVM log config of sessions we start (spark.py)
    python_requires=">=3.10",
    # horovod is built from source by scripts/build_horovod.sh (no wheel exists for 0.28.1).
    install_requires=_requirements("requirements/base.txt"),
    extras_require={"horovod": ["horovod==0.28.1"]},
    entry_points={"console_scripts": ["dl-pipeline=dl_pipeline.cli:main"]},
)
