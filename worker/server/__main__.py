from worker.server.main import main

main()
