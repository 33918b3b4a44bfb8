from setuptools import find_packages, setup

setup(
    name="minidist",
    version="0.1.0",
    description="A small distributed task runtime: concurrent.futures, multiprocessing.Pool "
                "and dask collections on a cluster, built on the standard library",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minidist", "minidist.*"]),
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Distributed Computing",
    ],
    install_requires=["cloudpickle>=2.2"],
    extras_require={
        "dask": ["dask[array,bag,dataframe]"],
        "test": ["pytest", "pytest-timeout", "numpy", "pandas", "dask[array,bag,dataframe]",
                 "prometheus_client", "joblib", "scikit-learn", "ruff", "mypy"],
        "bench": ["numpy", "dask[array,bag,dataframe]", "distributed"],
    },
    entry_points={"console_scripts": [
        "dcenter = minidist.center:main",
        "dworker = minidist.worker:main",
        "dssh = minidist.ssh:main",
    ]},
)
