"""spark-submit entry point for `dl-pipeline score`.

    spark-submit --py-files dist/dl_pipeline.zip --files conf/ag_news.yaml \
        jobs/score.py --config ag_news.yaml --set key=value

Arguments are exactly the console script's; this file only hands them over.
"""

import sys

from dl_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="score", prog="jobs/score.py"))
